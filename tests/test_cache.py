"""The HTTP cache follows RFC 9111 for a shared cache, through the real proxy."""

import concurrent.futures
import itertools
import time
from email.utils import formatdate, parsedate_to_datetime

import pytest
import requests
from conftest import raw_exchange, single_route

_unique = itertools.count()


@pytest.fixture(scope="module")
def cached(request, session_tmp, upstream):
    from conftest import Proxy
    proxy = Proxy(session_tmp, single_route(upstream.port) + "\n[cache]\nmax_entry_size = 4k\n")
    yield proxy
    proxy.stop()


def url(proxy, **query):
    query.setdefault("id", next(_unique))  # every test its own cache key
    return proxy.url + "/cacheable?" + "&".join(f"{k}={v}" for k, v in query.items())


def get(target, **kw):
    r = requests.get(target, timeout=10, **kw)
    return r, (r.json() if r.status_code == 200 and r.content.strip() else None)


def test_max_age_is_served_from_the_cache_with_age(cached):
    target = url(cached, cc="max-age=60")
    r1, b1 = get(target)
    r2, b2 = get(target)
    assert (r1.headers["X-Cache"], r2.headers["X-Cache"]) == ("MISS", "HIT")
    assert b1["n"] == b2["n"] == 1
    assert int(r2.headers["Age"]) >= 0


def test_a_hit_keeps_the_origins_date_and_its_age_grows(cached):
    # The origin's clock says 100 s ago: a proxy's own Date would be now.
    target = url(cached, cc="max-age=600", date=100)
    r1, _ = get(target)
    time.sleep(2.2)
    r2, _ = get(target)
    assert (r1.headers["X-Cache"], r2.headers["X-Cache"]) == ("MISS", "HIT")
    assert r2.headers["Date"] == r1.headers["Date"]
    assert time.time() - parsedate_to_datetime(r2.headers["Date"]).timestamp() > 95
    # Age counts from the origin's Date (apparent age, RFC 9111 4.2.3).
    assert int(r2.headers["Age"]) >= 100
    head = raw_exchange(cached.port, b"GET " + target[len(cached.url):].encode()
                        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").split(b"\r\n\r\n")[0]
    assert head.lower().count(b"\r\ndate: ") == 1  # the stored one, not the proxy's beside it


def test_an_answer_of_the_proxy_itself_gets_the_proxys_date(cached):
    head = raw_exchange(cached.port, b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 405")
    date = [line[6:] for line in head.split(b"\r\n") if line.lower().startswith(b"date: ")]
    assert len(date) == 1
    assert abs(parsedate_to_datetime(date[0].decode()).timestamp() - time.time()) < 30


@pytest.mark.parametrize("cc", ["no-store", "private, max-age=60", "max-age=60, no-store"])
def test_no_store_and_private_are_never_stored(cached, cc):
    target = url(cached, cc=cc.replace(" ", ""))
    bodies = [get(target)[1]["n"] for _ in range(2)]
    assert bodies == [1, 2]


def test_s_maxage_beats_max_age_for_a_shared_cache(cached):
    target = url(cached, cc="max-age=0,s-maxage=60")
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 1]


def test_no_cache_response_is_revalidated_every_time(cached):
    target = url(cached, cc="no-cache", etag="v1")
    r1, b1 = get(target)
    r2, b2 = get(target)
    assert r2.headers["X-Cache"] == "EXPIRED"
    assert b2["n"] == 1  # the stored body, confirmed by a 304
    r3, b3 = get(target)
    assert b3["n"] == 1 and r3.headers["X-Cache"] == "EXPIRED"


def test_stale_must_revalidate_entry_is_revalidated_and_refreshed(cached):
    # Date has a resolution of a second: leave room for it.
    target = url(cached, cc="max-age=2,must-revalidate", etag="v2")
    get(target)
    time.sleep(2.1)
    r, body = get(target)
    assert r.headers["X-Cache"] == "EXPIRED" and body["n"] == 1
    r, body = get(target)  # refreshed by the 304: fresh again
    assert r.headers["X-Cache"] == "HIT"


def test_stale_entry_without_validators_is_fetched_again(cached):
    target = url(cached, cc="max-age=1")
    get(target)
    time.sleep(1.2)
    r, body = get(target)
    assert body["n"] == 2 and r.headers["X-Cache"] == "EXPIRED"


def test_expires_gives_freshness(cached):
    assert [get(url(cached, expires=60, id="exp"))[1]["n"] for _ in range(2)] == [1, 1]
    target = url(cached, expires=-10)
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 2]


def test_age_from_upstream_counts(cached):
    target = url(cached, cc="max-age=60", age=59)
    get(target)
    time.sleep(1.2)
    assert get(target)[1]["n"] == 2


def test_heuristic_freshness_from_last_modified(cached):
    target = url(cached, lm=10 * 86400)
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 1]


def test_surrogate_control_is_the_gateways_own(cached):
    target = url(cached, sc="max-age=60", cc="no-store")
    r1, b1 = get(target)
    r2, b2 = get(target)
    assert b1["n"] == b2["n"] == 1 and r2.headers["X-Cache"] == "HIT"
    assert "Surrogate-Control" not in r1.headers and "Surrogate-Control" not in r2.headers
    target = url(cached, sc="no-store", cc="max-age=60")
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 2]


def test_vary_keeps_one_variant_per_header_value(cached):
    target = url(cached, cc="max-age=60", vary="Accept")
    seen = [(get(target, headers={"Accept": accept})[1]) for accept in ("text/a", "text/a", "text/b", "text/b")]
    assert [b["accept"] for b in seen] == ["text/a", "text/a", "text/b", "text/b"]
    assert [b["n"] for b in seen] == [1, 1, 2, 2]


def test_vary_star_is_not_stored(cached):
    target = url(cached, cc="max-age=60", vary="*")
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 2]


def test_set_cookie_is_never_stored(cached):
    target = url(cached, cc="public,max-age=60", cookie=1)
    assert [get(target)[1]["n"] for _ in range(2)] == [1, 2]


def test_authorization_requests_stored_only_when_the_response_allows(cached):
    auth = {"Authorization": "Bearer x"}
    target = url(cached, cc="max-age=60")
    assert [get(target, headers=auth)[1]["n"] for _ in range(2)] == [1, 2]
    target = url(cached, cc="public,max-age=60")
    assert [get(target, headers=auth)[1]["n"] for _ in range(2)] == [1, 1]


def test_client_conditional_is_answered_from_the_cache(cached):
    target = url(cached, cc="max-age=60", etag="v9")
    get(target)
    r = requests.get(target, headers={"If-None-Match": '"v9"'}, timeout=10)
    assert r.status_code == 304 and r.headers["X-Cache"] == "HIT" and r.headers["ETag"] == '"v9"'
    r = requests.get(target, headers={"If-None-Match": '"other"'}, timeout=10)
    assert r.status_code == 200 and r.json()["n"] == 1


def test_request_no_cache_and_max_age_zero_go_to_the_upstream(cached):
    target = url(cached, cc="max-age=60")
    get(target)
    assert get(target, headers={"Cache-Control": "no-cache"})[1]["n"] == 2
    assert get(target, headers={"Cache-Control": "max-age=0"})[1]["n"] == 3
    assert get(target, headers={"Pragma": "no-cache"})[1]["n"] == 4
    assert get(target)[0].headers["X-Cache"] == "HIT"


def test_head_is_answered_from_a_stored_get(cached):
    target = url(cached, cc="max-age=60")
    get(target)
    r = requests.head(target, timeout=10)
    assert r.headers["X-Cache"] == "HIT" and r.content == b""


def test_unsafe_method_invalidates(cached):
    target = url(cached, cc="max-age=60")
    get(target)
    assert requests.post(target, data=b"x", timeout=10).status_code == 200
    assert get(target)[1]["n"] == 3  # GET, POST, then GET again upstream


def test_too_large_for_an_entry_streams_through_unstored(cached):
    target = url(cached, cc="max-age=60", size=10000)
    r1, r2 = requests.get(target, timeout=10), requests.get(target, timeout=10)
    assert len(r1.content) == len(r2.content) == 10000
    assert (r1.json()["n"], r2.json()["n"]) == (1, 2)


def test_concurrent_misses_send_one_request_upstream(cached):
    target = url(cached, cc="max-age=60", delay="0.5")
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: requests.get(target, timeout=10), range(10)))
    assert {r.json()["n"] for r in answers} == {1}
    assert sorted(r.headers["X-Cache"] for r in answers).count("MISS") == 1


def test_range_and_request_no_store_bypass(cached):
    target = url(cached, cc="max-age=60")
    get(target)
    assert requests.get(target, headers={"Cache-Control": "no-store"}, timeout=10).headers["X-Cache"] == "BYPASS"


SITE = {"Host": "shop.example"}  # both instances serve one site: one key


def test_redis_cache_is_shared_and_survives_an_outage(start_proxy, upstream, redis_server):
    section = f"\n[cache]\nstorage = {redis_server.url}\nstorage_timeout = 300ms\nstorage_retry = 500ms\n"
    first = start_proxy(single_route(upstream.port) + section)
    second = start_proxy(single_route(upstream.port) + section)
    path = f"/cacheable?cc=max-age=60&id=redis-{next(_unique)}"
    r1 = requests.get(first.url + path, headers=SITE, timeout=10)
    r2 = requests.get(second.url + path, headers=SITE, timeout=10)
    assert (r1.headers["X-Cache"], r2.headers["X-Cache"]) == ("MISS", "HIT") and r2.json()["n"] == 1
    redis_server.stop()
    r3 = requests.get(first.url + path, headers=SITE, timeout=10)
    assert r3.status_code == 200 and r3.headers["X-Cache"] == "BYPASS"
    requests.get(first.url + path, headers=SITE, timeout=10)
    assert first.log().count("bypassing the cache until it is back") == 1
    redis_server.start_again()
    time.sleep(0.7)  # storage_retry: then the next request tries Redis again
    r4 = requests.get(first.url + path, headers=SITE, timeout=10)
    r5 = requests.get(first.url + path, headers=SITE, timeout=10)
    assert (r4.headers["X-Cache"], r5.headers["X-Cache"]) == ("MISS", "HIT")
    assert "is back" in first.log()


def test_concurrent_misses_over_two_instances_reach_the_origin_once_with_redis(start_proxy, upstream,
                                                                               redis_server):
    section = f"\n[cache]\nstorage = {redis_server.url}\n"
    proxies = [start_proxy(single_route(upstream.port) + section, workers=2) for _ in range(2)]
    path = f"/cacheable?cc=max-age=60&delay=1&id=redis-{next(_unique)}"

    def fetch(i):
        r = requests.get(proxies[i % 2].url + path, headers=SITE, timeout=20)
        return r.json()["n"], r.headers["X-Cache"]

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(fetch, range(40)))
    assert {n for n, _ in answers} == {1}  # one request of the fleet went to the origin
    assert [label for _, label in answers].count("MISS") == 1


def test_the_redis_lock_is_held_by_one_at_a_time_and_expires(redis_server):
    from rproxy.httpcache.store import RedisStore
    store = RedisStore(redis_server.url, timeout=2)
    first, second = store.lock("k", 0.3), store.lock("k", 0.3)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    time.sleep(0.4)  # its holder died: the lock goes by itself
    assert first.acquire()
    second.release()  # expired: no longer second's to release
    assert not second.acquire()


class Origin:
    """Answers each path with the header lines a test set for it (any bytes,
    invalid ones too); the body counts the answers for that path."""

    def __init__(self):
        self.headers: dict[str, list[str]] = {}
        self.answers: dict[str, int] = {}

    def __call__(self, head: bytes) -> bytes:
        path = head.split(b" ", 2)[1].decode()
        n = self.answers[path] = self.answers.get(path, 0) + 1
        lines = "".join(line + "\r\n" for line in self.headers.get(path, []))
        return (f"HTTP/1.1 200 OK\r\n{lines}Content-Length: {len(str(n))}\r\nConnection: close\r\n\r\n{n}").encode()


@pytest.fixture(scope="module")
def origin_cache(session_tmp):
    from conftest import Proxy
    from scripted_upstream import ScriptedUpstream
    origin = Origin()
    upstream = ScriptedUpstream(origin)
    proxy = Proxy(session_tmp, single_route(upstream.port) + "\n[cache]\ntargeted_fields = CDN-Cache-Control\n")
    yield proxy, origin
    proxy.stop()
    upstream.stop()


def answered(origin_cache, *lines, times=2, **kw):
    """GET one fresh path `times` times; the origin's counts and the last response."""
    proxy, origin = origin_cache
    path = f"/o{next(_unique)}"
    origin.headers[path] = list(lines)
    responses = [requests.get(proxy.url + path, timeout=10, **kw) for _ in range(times)]
    return [r.text for r in responses], responses[-1]


@pytest.mark.parametrize("expires", ["0", "Thu, 18 Aug 2050 02:01:18 UTC", "Thu, 18 Aug 50 02:01:18 GMT"])
def test_invalid_expires_is_already_expired(origin_cache, expires):
    assert answered(origin_cache, f"Expires: {expires}")[0] == ["1", "2"]


def test_obsolete_expires_forms_still_give_freshness(origin_cache):
    assert answered(origin_cache, "Expires: Thu Aug 18 02:01:18 2050")[0] == ["1", "1"]


@pytest.mark.parametrize("age, reused", [("abc", True), ("-7200", True), ("0, 7200", True), ("7200, 0", False)])
def test_age_is_read_by_its_first_member_and_an_invalid_one_ignored(origin_cache, age, reused):
    bodies, _ = answered(origin_cache, "Cache-Control: max-age=3600", f"Age: {age}")
    assert bodies == (["1", "1"] if reused else ["1", "2"])


def test_cdn_cache_control_decides_for_the_proxy_and_reaches_the_client(origin_cache):
    bodies, last = answered(origin_cache, "Cache-Control: no-store", "CDN-Cache-Control: max-age=60")
    assert bodies == ["1", "1"] and last.headers["X-Cache"] == "HIT"
    # Forwarded as received: a CDN behind rproxy reads it too (RFC 9213 2.1).
    assert last.headers["CDN-Cache-Control"] == "max-age=60" and last.headers["Cache-Control"] == "no-store"
    assert answered(origin_cache, "Cache-Control: max-age=60", "CDN-Cache-Control: private")[0] == ["1", "2"]
    # Not a valid Structured Field: ignored, Cache-Control decides.
    assert answered(origin_cache, "Cache-Control: max-age=60", "CDN-Cache-Control: max-age=5, &&")[0] == ["1", "1"]


def test_no_guessed_freshness_for_a_request_with_a_cookie(origin_cache):
    modified = "Last-Modified: " + formatdate(time.time() - 10 * 86400, usegmt=True)
    assert answered(origin_cache, modified, headers={"Cookie": "session=1"})[0] == ["1", "2"]
    assert answered(origin_cache, modified)[0] == ["1", "1"]
    assert answered(origin_cache, modified, "Cache-Control: public",
                    headers={"Cookie": "session=1"})[0] == ["1", "1"]
