"""While Redis hangs or is down, the rate limit and the cache leave it alone
for storage_retry after one failure: requests go on at once instead of each
waiting storage_timeout, the log says it once, the metrics count it, and
Redis is used again once it is back."""

import contextlib
import signal
import time

import requests
from conftest import free_port, single_route
from test_observability import metric, scrape

from rproxy.storage_guard import redacted

TIMEOUT = 0.4     # storage_timeout
REQUESTS = 20     # sent one after another while Redis hangs


@contextlib.contextmanager
def hung(redis_server):
    """Redis accepts connections (the kernel does) but answers nothing."""
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def timed_gets(url: str, count: int, **kwargs) -> tuple[list[requests.Response], float]:
    started = time.monotonic()
    answers = [requests.get(url, timeout=10, **kwargs) for _ in range(count)]
    return answers, time.monotonic() - started


def test_hung_redis_costs_the_rate_limit_one_timeout_not_one_per_request(start_proxy, upstream, redis_server,
                                                                          hardening_record):
    admin = free_port()
    section = (f"[rate_limit]\nlimit = 30/minute\nstorage = {redis_server.url}\n"
               f"storage_timeout = {TIMEOUT}s\nstorage_retry = 1s\n[admin]\nbind = 127.0.0.1:{admin}\n")
    proxy = start_proxy(single_route(upstream.port) + "\n" + section)
    assert requests.get(proxy.url + "/echo", timeout=10).headers["RateLimit-Remaining"] == "29"
    with hung(redis_server):
        answers, took = timed_gets(proxy.url + "/echo", REQUESTS)
        text = scrape(admin)
    assert [r.status_code for r in answers] == [200] * REQUESTS
    # Each request waiting for Redis would take REQUESTS x TIMEOUT = 8 s; the
    # breaker leaves it alone after the first timeout (and one retry a second).
    assert took < REQUESTS * TIMEOUT / 3, took
    assert len(proxy.log_lines(r"\[rate_limit:rate_limit\] storage redis://127.0.0.1:\d+/0 failed "
                               r"\(Timeout.*allowing requests until it is back")) == 1
    assert metric(text, "rproxy_storage_down", user="rate_limit:rate_limit") == 1
    assert metric(text, "rproxy_storage_skipped_total", user="rate_limit:rate_limit") >= REQUESTS / 2
    assert metric(text, "rproxy_storage_errors_total", user="rate_limit:rate_limit") >= 1

    # Redis answers again: after storage_retry the next request tries it, and
    # the limit applies again.
    time.sleep(1.2)
    remaining = []
    for _ in range(40):
        r = requests.get(proxy.url + "/echo", timeout=10)
        if r.status_code == 429:
            break
        remaining.append(int(r.headers["RateLimit-Remaining"]))
    assert r.status_code == 429, remaining
    assert remaining == sorted(remaining, reverse=True) and len(set(remaining)) == len(remaining)
    proxy.wait_for_log(r"\[rate_limit:rate_limit\] storage .* is back; counting again")
    assert metric(scrape(admin), "rproxy_storage_down", user="rate_limit:rate_limit") == 0
    hardening_record((f"Redis hung (SIGSTOP) under the rate limit, storage_timeout {TIMEOUT * 1000:.0f} ms",
                      f"{REQUESTS} requests in a row", f"all 200 in {took:.2f} s (not {REQUESTS * TIMEOUT:.0f} s), "
                      f"logged once; limits apply again after SIGCONT"))


def test_hung_redis_with_deny_refuses_at_once_with_retry_after(start_proxy, upstream, redis_server):
    section = (f"[rate_limit]\nlimit = 30/minute\nstorage = {redis_server.url}\n"
               f"storage_timeout = {TIMEOUT}s\nstorage_retry = 30s\non_storage_error = deny\n")
    proxy = start_proxy(single_route(upstream.port) + "\n" + section)
    with hung(redis_server):
        answers, took = timed_gets(proxy.url + "/echo", REQUESTS)
    assert [r.status_code for r in answers] == [503] * REQUESTS
    assert all(1 <= int(r.headers["Retry-After"]) <= 30 for r in answers)
    assert took < REQUESTS * TIMEOUT / 3, took
    assert len(proxy.log_lines("denying requests until it is back")) == 1


def test_hung_redis_costs_the_cache_one_timeout_not_one_per_request(start_proxy, upstream, redis_server,
                                                                    hardening_record):
    section = f"\n[cache]\nstorage = {redis_server.url}\nstorage_timeout = {TIMEOUT}s\nstorage_retry = 1s\n"
    proxy = start_proxy(single_route(upstream.port) + section)
    url = proxy.url + f"/cacheable?cc=max-age=60&id=breaker-{time.monotonic_ns()}"
    assert [requests.get(url, timeout=10).headers["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    with hung(redis_server):
        answers, took = timed_gets(url, REQUESTS)
    assert all(r.status_code == 200 and r.headers["X-Cache"] == "BYPASS" for r in answers)
    assert took < REQUESTS * TIMEOUT / 3, took
    assert len(proxy.log_lines(r"\[cache:cache\] storage .* failed .*bypassing the cache until it is back")) == 1
    time.sleep(1.2)
    labels = [requests.get(url, timeout=10).headers["X-Cache"] for _ in range(2)]
    assert labels == ["HIT", "HIT"]  # the entry stored before the outage
    proxy.wait_for_log(r"\[cache:cache\] storage .* is back")
    hardening_record((f"Redis hung (SIGSTOP) under the cache, storage_timeout {TIMEOUT * 1000:.0f} ms",
                      f"{REQUESTS} requests in a row", f"all 200 BYPASS in {took:.2f} s (not "
                      f"{REQUESTS * TIMEOUT:.0f} s), logged once; HIT again after SIGCONT"))



def test_storage_logs_never_show_redis_credentials():
    assert redacted("redis://:s3cret@127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted("rediss://user:p@ss@redis.example:6380/1") == "rediss://redis.example:6380/1"
    assert redacted("memory://") == "memory://"
