"""The cache and the rate limit on a Redis reached through Sentinel, on a
Redis Cluster and on a Redis over TLS (rediss://): real redis-server processes, two proxy instances sharing a
stored response and a limit through them, and a purge through one reaching the other."""

import itertools

import pytest
import requests
from conftest import free_port, redis_cli, single_route

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


def test_a_purge_by_prefix_and_by_tag_through_one_instance_reaches_the_other(start_proxy, upstream, topology):
    admin = free_port()
    config = single_route(upstream.port) + f"\n[cache]\nstorage = {topology.url}\n"
    first = start_proxy(config + f"[admin]\nbind = 127.0.0.1:{admin}\n")
    second = start_proxy(config)
    group = f"/cacheable?cc=max-age=600&id=purge-{next(_unique)}"
    paths = [f"{group}-{i}" + ("&tags=sale" if i % 2 else "") for i in range(8)]
    for path in paths:
        assert requests.get(first.url + path, headers=SITE, timeout=10).headers["X-Cache"] == "MISS"
        assert requests.get(second.url + path, headers=SITE, timeout=10).headers["X-Cache"] == "HIT"
    servers = getattr(topology, "nodes", None) or [getattr(topology, "master", topology)]
    holding = [int(redis_cli(s.port, *getattr(s, "cli", ()), "EVAL",
                             "return #redis.call('KEYS', ARGV[1])", "0", f"rproxy:cache:*{group[11:]}*")) for s in servers]
    assert sum(holding) == 8 and (len(servers) == 1 or sum(1 for n in holding if n) >= 2), holding  # spread on a cluster

    def purge(**field):
        r = requests.post(f"http://127.0.0.1:{admin}/purge", data=field, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["purged"]

    assert purge(tag="sale") == 4
    assert [requests.get(second.url + p, headers=SITE, timeout=10).headers["X-Cache"] for p in paths[:2]] == \
        ["HIT", "MISS"]
    assert purge(prefix="http://shop.example" + group) == 5  # the four left, and the one just fetched again
    assert {requests.get(second.url + p, headers=SITE, timeout=10).headers["X-Cache"] for p in paths[::2]} == {"MISS"}
