"""Purge: stored responses removed by URL, prefix or tag (Surrogate-Key,
Cache-Tag) through the admin listener, seen at once by every worker of a
host (disk store) and every instance (Redis); counted in /metrics; never
served on a normal listener. Pure parts first, then real proxies."""

import itertools
import re
import time

import pytest
import requests
from conftest import free_port, single_route

from rproxy.httpcache.disk import DiskStore
from rproxy.httpcache.purge import parse_request, tags_of
from rproxy.httpcache.redis_uri import parse
from rproxy.httpcache.rules import Entry
from rproxy.httpcache.store import MemoryStore

_unique = itertools.count()


def entry(*headers) -> Entry:
    now = time.time()
    return Entry(200, "OK", [("Cache-Control", "max-age=60"), *headers], b"x", now, now)


# -- pure parts ---------------------------------------------------------------

def test_tags_come_from_surrogate_key_and_cache_tag():
    assert tags_of([("Surrogate-Key", " a  b\tc "), ("Cache-Tag", "d, e ,f"), ("X", "g")]) == set("abcdef")


@pytest.mark.parametrize("query,form,expected", [
    ("url=http://Example.COM/a?b=1", "", ("url", "http://example.com/a?b=1")),
    ("", "url=http%3A%2F%2Fexample.com", ("url", "http://example.com/")),
    ("prefix=https://example.com/img/", "", ("prefix", "https://example.com/img/")),
    ("", "tag=product-42", ("tag", "product-42")),
])
def test_a_purge_request_names_one_url_prefix_or_tag(query, form, expected):
    assert parse_request(query, form) == expected


@pytest.mark.parametrize("query,message", [
    ("", "exactly one"), ("url=a&tag=b", "exactly one"), ("tag=", "exactly one"),
    ("url=/path", "scheme and host"), ("key=x", "unknown field 'key'"),
])
def test_a_bad_purge_request_says_what_is_wrong(query, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_request(query, "")


@pytest.mark.parametrize("make", [lambda tmp: MemoryStore(1 << 20), lambda tmp: DiskStore(str(tmp), 1 << 20)])
def test_each_store_purges_by_url_prefix_and_tag(make, tmp_path):
    store = make(tmp_path)
    for key, tags in [("http://h/a/1", "t1"), ("http://h/a/2", "t2"), ("http://h/b/1", "t1 t3"),
                      ("http://h/b/2", "")]:
        store.put(key, [entry(("Surrogate-Key", tags))])
    assert store.delete("http://h/b/2") == 1 and store.delete("http://h/b/2") == 0
    assert store.purge_prefix("http://h/a/") == 2
    assert store.purge_tag("t3") == 1
    assert [bool(store.get(k)) for k in ("http://h/a/1", "http://h/a/2", "http://h/b/1")] == [False] * 3


@pytest.mark.parametrize("uri,nodes,service,db", [
    ("redis://127.0.0.1:6379/2", (("127.0.0.1", 6379),), None, 2),
    ("rediss://:secret@cache.example:6380/0", (("cache.example", 6380),), None, 0),
    ("redis+sentinel://s1:26379,s2/mymaster/1", (("s1", 26379), ("s2", 26379)), "mymaster", 1),
    ("redis+cluster://n1:7000,[::1]:7001", (("n1", 7000), ("::1", 7001)), None, 0),
])
def test_redis_uris_of_every_topology_parse(uri, nodes, service, db):
    parsed = parse(uri)
    assert (parsed.nodes, parsed.service, parsed.db) == (nodes, service, db)


@pytest.mark.parametrize("section", ["rate_limit", "cache"])
@pytest.mark.parametrize("uri", ["redis+sentinel://s1:26379/mymaster", "redis+cluster://n1:7000,n2:7001",
                                 "rediss://cache.example:6380/0"])
def test_sentinel_cluster_and_tls_redis_are_accepted_by_the_config(section, uri, tmp_path):
    from rproxy import config
    ini = tmp_path / "rproxy.ini"
    limit = "limit = 10/second\n" if section == "rate_limit" else ""
    ini.write_text(single_route(9) + f"\n[{section}]\n{limit}storage = {uri}\n")
    loaded = config.load(str(ini))
    assert loaded.middleware[section][""].storage == uri


@pytest.mark.parametrize("uri,message", [("redis+sentinel://s1:26379", "mymaster"),
                                         ("redis://a:1,b:2", "redis+sentinel:// or redis+cluster://")])
def test_a_redis_uri_missing_a_part_is_a_config_error_naming_the_key(uri, message, tmp_path):
    from rproxy import config
    ini = tmp_path / "rproxy.ini"
    ini.write_text(single_route(9) + f"\n[cache]\nstorage = {uri}\n")
    with pytest.raises(Exception) as error:
        config.load(str(ini))
    text = str(error.value)
    assert "[cache]" in text and "storage" in text and message in text


# -- through real proxies -----------------------------------------------------

class Admin:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def purge(self, **field) -> dict:
        r = requests.post(self.url + "/purge", data=field, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def metric(self, name: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def start(start_proxy, upstream, storage: str, workers: int = 2, extra: str = ""):
    admin = free_port()
    ini = (single_route(upstream.port) + f"\n[cache]\nstorage = {storage}\n"
           f"[admin]\nbind = 127.0.0.1:{admin}\n{extra}")
    return start_proxy(ini, workers=workers), Admin(admin)


def stored_everywhere(proxies, target: str, headers=None, tries: int = 40) -> int:
    """Fetches `target` through each proxy, many times (so that every
    worker answers), until all say HIT; the origin's count it served."""
    deadline = time.monotonic() + 10
    for proxy in proxies:
        hits = 0
        while hits < tries:
            r = requests.get(proxy.url + target, headers=headers, timeout=10)
            hits = hits + 1 if r.headers["X-Cache"] == "HIT" else 0
            assert time.monotonic() < deadline, "the entry was not stored"
    return r.json()["n"]


def misses_everywhere(proxies, target: str, headers=None, tries: int = 20) -> bool:
    """After a purge, the first request misses (fetched again) and no
    worker still answers the old entry."""
    first = requests.get(proxies[0].url + target, headers=headers, timeout=10)
    if first.headers["X-Cache"] != "MISS":
        return False
    n = first.json()["n"]
    return all(requests.get(p.url + target, headers=headers, timeout=10).json()["n"] == n
               for p in proxies for _ in range(tries))


def paths(tag: str = "") -> dict:
    base = f"purge{next(_unique)}"
    return {name: f"/cacheable?id={base}-{name}&cc=max-age=600" + (f"&tags={tag}" if tag else "")
            for name in ("one", "two")}


def test_purge_by_url_prefix_and_tag_reaches_every_worker_with_the_disk_store(start_proxy, upstream, tmp_path):
    proxy, admin = start(start_proxy, upstream, f"file://{tmp_path / 'cache'}", workers=3)
    host = f"127.0.0.1:{proxy.url.rsplit(':', 1)[1]}"
    # by URL
    target = paths()["one"]
    assert stored_everywhere([proxy], target) == 1
    assert admin.purge(url=f"http://{host}{target}")["purged"] == 1
    assert misses_everywhere([proxy], target)
    # by prefix: both URLs under it, nothing else
    group, other = paths(), paths()["one"]
    for target in [*group.values(), other]:
        stored_everywhere([proxy], target)
    prefix = group["one"].split("-one")[0]
    assert admin.purge(prefix=f"http://{host}{prefix}")["purged"] == 2
    assert all(misses_everywhere([proxy], t) for t in group.values())
    assert requests.get(proxy.url + other, timeout=10).headers["X-Cache"] == "HIT"
    # by tag (Surrogate-Key)
    tagged = paths("news sport")
    for target in tagged.values():
        stored_everywhere([proxy], target)
    assert admin.purge(tag="sport")["purged"] == 2
    assert all(misses_everywhere([proxy], t) for t in tagged.values())
    assert admin.metric("rproxy_cache_purges_total") == 3
    assert admin.metric("rproxy_cache_purged_entries_total") == 5


def test_purge_through_one_instance_reaches_another_with_redis(start_proxy, upstream, redis_server):
    first, admin = start(start_proxy, upstream, redis_server.url)
    second, _ = start(start_proxy, upstream, redis_server.url)
    host = {"Host": "cache.test"}  # one key for both instances
    tagged = {name: t.replace("&tags=", "&cachetag=") for name, t in paths("promo, spring").items()}
    for target in tagged.values():
        stored_everywhere([first, second], target, host)
    assert admin.purge(tag="spring")["purged"] == 2
    assert all(misses_everywhere([second, first], t, host) for t in tagged.values())
    group = paths()
    for target in group.values():
        stored_everywhere([first, second], target, host)
    assert admin.purge(url="http://cache.test" + group["one"])["purged"] == 1
    assert misses_everywhere([second, first], group["one"], host)
    assert admin.purge(prefix="http://cache.test" + group["two"][:12])["purged"] >= 1
    assert misses_everywhere([second, first], group["two"], host)
    assert admin.metric("rproxy_cache_purges_total") == 3


def test_a_purge_on_the_normal_listener_is_forwarded_not_served(start_proxy, upstream, tmp_path):
    proxy, admin = start(start_proxy, upstream, f"file://{tmp_path / 'cache'}")
    target = paths()["one"]
    stored_everywhere([proxy], target, tries=4)
    r = requests.post(proxy.url + "/purge", data={"prefix": "http://"}, timeout=10)
    assert "purged" not in r.text  # the route's upstream answered it
    assert requests.get(proxy.url + target, timeout=10).headers["X-Cache"] == "HIT"
    assert admin.metric("rproxy_cache_purges_total") == 0


def test_purge_with_only_a_memory_cache_is_refused_clearly(start_proxy, upstream):
    _, admin = start(start_proxy, upstream, "memory://", workers=1)
    r = requests.post(admin.url + "/purge", data={"tag": "x"}, timeout=10)
    assert r.status_code == 409 and "memory://" in r.text
    assert requests.get(admin.url + "/purge?tag=x", timeout=10).status_code == 405
    bad = requests.post(admin.url + "/purge", data={"tag": "x", "url": "http://a/"}, timeout=10)
    assert bad.status_code == 400 and "exactly one" in bad.text
