"""The cache and the rate limit on a Redis reached through Sentinel, on a
Redis Cluster and on a Redis over TLS (rediss://): real redis-server processes, two proxy instances sharing a
stored response and a limit through them."""

import itertools

import pytest
import requests
from conftest import redis_cli, single_route

_unique = itertools.count()
SITE = {"Host": "shop.example"}  # both instances serve one site: one cache key


def two_proxies(start_proxy, upstream, storage: str):
    config = (single_route(upstream.port, route_extra="rate_limit = tight")
              + f"\n[cache]\nstorage = {storage}\n"
              + f"[rate_limit:tight]\nlimit = 3/hour\nstorage = {storage}\n")
    return start_proxy(config), start_proxy(config)


@pytest.fixture(params=["redis_sentinel", "redis_cluster", "redis_tls"])
def topology(request):
    return request.getfixturevalue(request.param)


def test_two_instances_share_a_stored_response_and_a_limit(start_proxy, upstream, topology):
    first, second = two_proxies(start_proxy, upstream, topology.url)
    path = f"/cacheable?cc=max-age=60&id=topology-{next(_unique)}"
    r1 = requests.get(first.url + path, headers=SITE, timeout=10)
    r2 = requests.get(second.url + path, headers=SITE, timeout=10)
    assert (r1.headers["X-Cache"], r2.headers["X-Cache"]) == ("MISS", "HIT")
    assert r1.json()["n"] == r2.json()["n"] == 1
    r3 = requests.get(first.url + path, headers=SITE, timeout=10)
    assert r3.headers["X-Cache"] == "HIT"
    # The limit of 3 counted over both instances: the fourth request is refused.
    assert requests.get(second.url + path, headers=SITE, timeout=10).status_code == 429
    # Both went through the topology: the entry and the counter are in its servers.
    servers = getattr(topology, "nodes", None) or [getattr(topology, "master", topology)]
    assert sum(int(redis_cli(s.port, *getattr(s, "cli", ()), "DBSIZE")) for s in servers) >= 2
    for proxy in (first, second):
        assert "bypassing" not in proxy.log() and "Redis" not in proxy.log(), proxy.log()
