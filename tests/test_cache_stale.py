"""Stale responses from the cache (RFC 5861, nginx's proxy_cache_use_stale):
served while revalidating, and instead of an upstream that is down, hangs or
answers 5xx; the rules with an injected clock, then the real proxy."""

import concurrent.futures
import itertools
import os
import signal
import time
from email.utils import formatdate

import pytest
import requests
from conftest import single_route

from rproxy.httpcache import stale
from rproxy.httpcache.rules import Entry
from rproxy.httpcache.store import Retention

NOW = 1_000_000.0
_unique = itertools.count()


def entry(cc: str, stored_at: float = NOW, etag: bool = False) -> Entry:
    headers = [("Date", formatdate(stored_at, usegmt=True)), ("Cache-Control", cc)]
    if etag:
        headers.append(("ETag", '"v1"'))
    return Entry(200, "OK", headers, b"body", stored_at, stored_at)


# --- the rules, with an injected clock ---

@pytest.mark.parametrize("late, allowed", [(-1, False), (0, True), (30, True), (31, False)])
def test_stale_while_revalidate_holds_for_its_window(late, allowed):
    stored = entry("max-age=10, stale-while-revalidate=30")
    assert stale.while_revalidating(stored, {}, now=NOW + 10 + late) is allowed


@pytest.mark.parametrize("cc", ["max-age=10, stale-while-revalidate=30, must-revalidate",
                                "max-age=10, stale-while-revalidate=30, no-cache", "max-age=10"])
def test_stale_while_revalidate_yields_to_prohibitions_and_needs_the_directive(cc):
    assert not stale.while_revalidating(entry(cc), {}, now=NOW + 15)


@pytest.mark.parametrize("request_cc", ["no-cache", "max-age=0", "min-fresh=5"])
def test_a_client_asking_for_a_fresh_answer_gets_no_stale_one(request_cc):
    stored = entry("max-age=10, stale-while-revalidate=30")
    assert not stale.while_revalidating(stored, {"Cache-Control": request_cc}, now=NOW + 15)


def test_s_maxage_with_stale_while_revalidate_is_the_origins_explicit_wish():
    stored = entry("s-maxage=10, stale-while-revalidate=30")
    assert stale.while_revalidating(stored, {}, now=NOW + 15)


def test_stale_if_error_from_the_response_or_the_request():
    stored = entry("max-age=10, stale-if-error=60")
    assert stale.on_failure(stored, {}, "error", frozenset(), 3600, now=NOW + 70) == "stale-if-error"
    assert stale.on_failure(stored, {}, "http_503", frozenset(), 3600, now=NOW + 71) is None
    plain = entry("max-age=10")
    asked = {"Cache-Control": "stale-if-error=100"}
    assert stale.on_failure(plain, asked, "timeout", frozenset(), 3600, now=NOW + 110) == "stale-if-error"
    assert stale.on_failure(plain, {}, "timeout", frozenset(), 3600, now=NOW + 11) is None


def test_use_stale_switch_covers_only_the_failures_it_names_up_to_stale_keep():
    plain = entry("max-age=10")
    switch = stale.use_stale("timeout http_502")
    assert stale.on_failure(plain, {}, "timeout", switch, 100, now=NOW + 110) == "use_stale"
    assert stale.on_failure(plain, {}, "http_502", switch, 100, now=NOW + 110) == "use_stale"
    assert stale.on_failure(plain, {}, "http_503", switch, 100, now=NOW + 20) is None
    assert stale.on_failure(plain, {}, "timeout", switch, 100, now=NOW + 111) is None


@pytest.mark.parametrize("cc", ["max-age=10, must-revalidate, stale-if-error=60", "max-age=10, proxy-revalidate",
                                "no-cache, stale-if-error=60", "s-maxage=10"])
def test_revalidation_directives_forbid_stale_on_failure(cc):
    switch = stale.use_stale("error")
    assert stale.on_failure(entry(cc), {}, "error", switch, 3600, now=NOW + 20) is None


@pytest.mark.parametrize("status, generated, what", [
    (504, True, "timeout"), (502, True, "error"), (503, True, "error"), (500, False, "http_500"),
    (503, False, "http_503"), (501, False, None), (404, False, None), (200, False, None)])
def test_failures_are_named_as_nginx_names_them(status, generated, what):
    assert stale.failure(status, generated) == what


def test_use_stale_values_are_checked():
    assert stale.use_stale("off") == stale.use_stale("") == frozenset()
    assert stale.use_stale("Error TIMEOUT") == {"error", "timeout"}
    with pytest.raises(ValueError, match="'updating' is not one of"):
        stale.use_stale("error updating")


def test_stale_entries_are_kept_as_long_as_they_may_be_used():
    fresh_for_10 = entry("max-age=10", stored_at=time.time())
    assert Retention(100).keep_for([fresh_for_10]) == pytest.approx(10, abs=2)  # no validators: not kept stale
    assert Retention(100, every=True).keep_for([fresh_for_10]) == pytest.approx(110, abs=2)
    with_etag = entry("max-age=10", stored_at=time.time(), etag=True)
    assert Retention(100).keep_for([with_etag]) == pytest.approx(110, abs=2)
    windows = entry("max-age=10, stale-while-revalidate=500, stale-if-error=300", stored_at=time.time())
    assert Retention(100).keep_for([windows]) == pytest.approx(510, abs=2)


# --- through the real proxy ---

def cached_url(proxy, cc: str, **query) -> str:
    ident = f"stale-{next(_unique)}"
    extra = "".join(f"&{k}={v}" for k, v in query.items())
    return proxy.url + f"/cacheable?id={ident}&cc={cc}{extra}", ident


def stored_then_stale(target: str, max_age: int = 1) -> requests.Response:
    first = requests.get(target, timeout=10)
    assert first.headers["X-Cache"] == "MISS" and first.json()["n"] == 1
    assert first.headers["Cache-Status"] == "rproxy; fwd=uri-miss; fwd-status=200"
    time.sleep(max_age + 1.1)  # Date has a resolution of a second
    return first


def start(start_proxy, upstream, cache: str = "", upstream_extra: str = ""):
    return start_proxy(single_route(upstream.port, upstream_extra=upstream_extra) + "\n[cache]\n" + cache)


def test_stale_if_error_answers_while_the_upstream_is_down(start_proxy, start_upstream):
    upstream = start_upstream()
    proxy = start(start_proxy, upstream)
    allowed, _ = cached_url(proxy, "max-age=1,stale-if-error=60")
    refused, _ = cached_url(proxy, "max-age=1")
    requests.get(refused, timeout=10)
    stored_then_stale(allowed)
    upstream.stop(signal.SIGKILL)

    r = requests.get(allowed, timeout=10)
    assert r.status_code == 200 and r.json()["n"] == 1
    assert r.headers["X-Cache"] == "STALE" and int(r.headers["Age"]) >= 2
    assert r.headers["Cache-Status"] == "rproxy; fwd=stale; detail=error"
    line = proxy.wait_for_log("serving the stored response instead")[0]
    assert "as stale-if-error allows" in line and "/cacheable?id=" in line
    # Without stale-if-error (and the switch off), the error is passed on.
    r = requests.get(refused, timeout=10)
    assert r.status_code in (502, 503) and r.headers["X-Cache"] == "EXPIRED"


def test_use_stale_answers_while_the_upstream_hangs(start_proxy, start_upstream):
    upstream = start_upstream()
    proxy = start(start_proxy, upstream, "use_stale = error timeout\n", "read_timeout = 1s\n")
    plain, _ = cached_url(proxy, "max-age=1")
    forbidden, _ = cached_url(proxy, "max-age=1,must-revalidate")
    requests.get(forbidden, timeout=10)
    stored_then_stale(plain)
    os.kill(upstream.pid, signal.SIGSTOP)
    try:
        r = requests.get(plain, timeout=10)
        assert r.status_code == 200 and r.json()["n"] == 1 and r.headers["X-Cache"] == "STALE"
        assert r.headers["Cache-Status"] == "rproxy; fwd=stale; detail=timeout"
        assert "as use_stale allows" in proxy.wait_for_log("serving the stored response instead")[0]
        # must-revalidate forbids it: the failure (the server is out of rotation now) goes through.
        assert requests.get(forbidden, timeout=10).status_code in (503, 504)
    finally:
        os.kill(upstream.pid, signal.SIGCONT)


@pytest.mark.parametrize("switch", ["http_500 http_502 http_503 http_504", "off"])
def test_upstream_5xx_is_replaced_by_the_stale_entry_when_allowed(start_proxy, upstream, switch):
    proxy = start(start_proxy, upstream, f"use_stale = {switch}\n")
    targets = {status: cached_url(proxy, "max-age=1") for status in (500, 502, 503, 504)}
    with_directive = cached_url(proxy, "max-age=1,stale-if-error=60")
    for target, _ in [*targets.values(), with_directive]:
        requests.get(target, timeout=10)
    time.sleep(2.1)
    for status, (target, ident) in [*targets.items(), (503, with_directive)]:
        requests.get(f"{upstream.url}/_fail?id={ident}&status={status}", timeout=5)
        r = requests.get(target, timeout=10)
        if switch == "off" and (target, ident) != with_directive:
            assert r.status_code == status and r.headers["X-Cache"] == "EXPIRED"
            assert r.headers["Cache-Status"] == f"rproxy; fwd=stale; fwd-status={status}"
        else:
            assert r.status_code == 200 and r.json()["n"] == 1 and r.headers["X-Cache"] == "STALE"
            assert r.headers["Cache-Status"] == f"rproxy; fwd=stale; fwd-status={status}; detail=http_{status}"
        requests.get(f"{upstream.url}/_fail?id={ident}", timeout=5)  # as before, for the next


def test_stale_while_revalidate_answers_at_once_and_revalidates_once(start_proxy, upstream):
    proxy = start(start_proxy, upstream)
    # Fresh for longer than the revalidation takes, so that its answer is fresh when stored.
    target, ident = cached_url(proxy, "max-age=5,stale-while-revalidate=60")
    stored_then_stale(target, max_age=5)
    requests.get(f"{upstream.url}/_fail?id={ident}&delay=2", timeout=5)

    def timed_get(_):
        started = time.monotonic()
        r = requests.get(target, timeout=10)
        return r, time.monotonic() - started
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(timed_get, range(8)))
    for r, took in answers:
        assert r.json()["n"] == 1 and r.headers["X-Cache"] == "STALE"
        assert r.headers["Cache-Status"].startswith("rproxy; hit; detail=stale-while-revalidate; ttl=-")
        assert int(r.headers["Age"]) >= 2
        assert took < 2  # not waiting for the upstream's 2 s revalidation
    deadline = time.monotonic() + 10
    while (r := requests.get(target, timeout=10)).headers["X-Cache"] != "HIT":
        assert r.headers["X-Cache"] == "STALE" and time.monotonic() < deadline
        time.sleep(0.1)
    assert r.json()["n"] == 2 and r.headers["Cache-Status"].startswith("rproxy; hit; ttl=")
    # One revalidation only: the next request the upstream answers is its third.
    assert requests.get(target, headers={"Cache-Control": "no-cache"}, timeout=10).json()["n"] == 3


def test_stale_while_revalidate_with_a_validator_freshens_the_entry(start_proxy, upstream):
    proxy = start(start_proxy, upstream)
    target, _ = cached_url(proxy, "max-age=1,stale-while-revalidate=60", etag="s1")
    stored_then_stale(target)
    assert requests.get(target, timeout=10).headers["X-Cache"] == "STALE"
    deadline = time.monotonic() + 10
    while (r := requests.get(target, timeout=10)).headers["X-Cache"] != "HIT":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.json() == {"n": 1, "revalidated": 0, "accept": "*/*"}  # the stored body, confirmed by a 304
    assert int(r.headers["Age"]) <= 1
