"""Rate limiting, path filtering and security headers, through the real proxy."""

import concurrent.futures
import time

import pytest
import requests
from conftest import raw_exchange, single_route


def limited(upstream_port, section, route_extra=""):
    return single_route(upstream_port, route_extra=route_extra) + "\n" + section


def test_rate_limit_answers_429_with_headers(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[rate_limit]\nlimit = 3/minute\n"))
    answers = [requests.get(proxy.url + "/echo", timeout=10) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert [r.headers["RateLimit-Remaining"] for r in answers] == ["2", "1", "0", "0", "0"]
    assert all(r.headers["RateLimit-Limit"] == "3" for r in answers)
    denied = answers[3]
    assert 0 < int(denied.headers["Retry-After"]) <= 60
    assert 0 < int(denied.headers["RateLimit-Reset"]) <= 60
    assert "too many requests" in denied.text


@pytest.mark.parametrize("strategy", ["moving-window", "fixed-window", "sliding-window-counter"])
def test_every_strategy_limits(start_proxy, upstream, strategy):
    proxy = start_proxy(limited(upstream.port, f"[rate_limit]\nlimit = 5/day; 2/hour\nstrategy = {strategy}\n"))
    codes = [requests.get(proxy.url + "/echo", timeout=10).status_code for _ in range(3)]
    # The tighter 2/hour speaks first (windows this long never turn over mid-test).
    assert codes == [200, 200, 429]


def test_rate_limit_counts_the_real_client_and_per_header(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[rate_limit]\nlimit = 2/minute\n"
                                               "[rate_limit:keys]\nlimit = 1/minute\nkey = header:X-Api-Key\n",
                                route_extra="") + "\n[route:api]\npath = /echo/api\nupstream = app\n"
                                                  "rate_limit = keys\n")
    # Behind a trusted proxy, clients are told apart by X-Forwarded-For.
    for client in ("203.0.113.1", "203.0.113.2"):
        codes = [requests.get(proxy.url + "/echo", headers={"X-Forwarded-For": client}, timeout=10).status_code
                 for _ in range(3)]
        assert codes == [200, 200, 429]
    assert requests.get(proxy.url + "/echo/api", headers={"X-Api-Key": "a"}, timeout=10).status_code == 200
    assert requests.get(proxy.url + "/echo/api", headers={"X-Api-Key": "a"}, timeout=10).status_code == 429
    assert requests.get(proxy.url + "/echo/api", headers={"X-Api-Key": "b"}, timeout=10).status_code == 200


def test_route_can_turn_the_rate_limit_off(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[rate_limit]\nlimit = 1/minute\n")
                        + "\n[route:free]\npath = /echo/free\nupstream = app\nrate_limit = off\n")
    assert [requests.get(proxy.url + "/echo/free", timeout=10).status_code for _ in range(3)] == [200] * 3


def test_memory_limits_with_several_workers_are_announced(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[rate_limit]\nlimit = 10/minute\n"), workers=2)
    assert "apply per worker" in proxy.log()


def test_redis_shares_one_budget_between_two_instances(start_proxy, upstream, redis_server):
    section = f"[rate_limit]\nlimit = 10/minute\nstorage = {redis_server.url}\n"
    first = start_proxy(limited(upstream.port, section), workers=2)
    second = start_proxy(limited(upstream.port, section))
    urls = [first.url, second.url] * 10
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda u: requests.get(u + "/echo", timeout=10).status_code, urls))
    assert codes.count(200) == 10 and codes.count(429) == 10


def test_redis_down_fails_open_logs_once_and_recovers(start_proxy, upstream, redis_server):
    section = (f"[rate_limit]\nlimit = 3/minute\nstorage = {redis_server.url}\nstorage_timeout = 300ms\n"
               "storage_retry = 500ms\n")
    proxy = start_proxy(limited(upstream.port, section))
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200
    redis_server.stop()
    codes = [requests.get(proxy.url + "/echo", timeout=10).status_code for _ in range(6)]
    assert codes == [200] * 6
    assert proxy.log().count("failed") >= 1 and proxy.log().count("allowing requests until it is back") == 1
    redis_server.start_again()
    time.sleep(0.7)  # storage_retry: then the next request tries Redis again
    codes = [requests.get(proxy.url + "/echo", timeout=10).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]  # a fresh Redis: counting again from zero
    assert proxy.log().count("is back; counting again") == 1


def test_redis_down_can_deny(start_proxy, upstream, redis_server):
    section = (f"[rate_limit]\nlimit = 3/minute\nstorage = {redis_server.url}\nstorage_timeout = 300ms\n"
               "on_storage_error = deny\n")
    proxy = start_proxy(limited(upstream.port, section))
    redis_server.stop()
    r = requests.get(proxy.url + "/echo", timeout=10)
    # Retry-After: when Redis is tried again (storage_retry, 5s by default).
    assert r.status_code == 503 and 1 <= int(r.headers["Retry-After"]) <= 5


@pytest.mark.parametrize("path", ["/admin", "/admin/", "/admin/x", "//admin", "/%61dmin", "/x/../admin",
                                  "/admin;jsessionid=1", "/admin.", "/./admin", "/ADMIN", "/.git/config",
                                  "/shop/cart.php", "/shop/CART.PHP"])
def test_filter_refuses_every_spelling_of_a_denied_path(start_proxy, upstream, path, request):
    proxy = request.getfixturevalue("filtered_proxy")
    with requests.Session() as s:
        prepared = requests.Request("GET", proxy.url + "/").prepare()
        prepared.url = proxy.url + path  # exactly as written, no client-side normalising
        r = s.send(prepared, timeout=10)
    assert r.status_code == 404, path


@pytest.fixture
def filtered_proxy(start_proxy, upstream):
    return start_proxy(limited(upstream.port, "[filter]\ndeny = /admin /.git *.php\ncase_insensitive = yes\n"))


def test_filter_lets_other_paths_through_and_can_answer_403(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[filter]\ndeny = /admin\nstatus = 403\n"
                                               "[filter:only-api]\nallow = /echo/api\ndeny = /echo/api/internal\n")
                        + "\n[route:api]\npath = /echo\nupstream = app\nfilter = only-api\n")
    assert requests.get(proxy.url + "/administrator", timeout=10).status_code != 403
    assert requests.get(proxy.url + "/admin/x", timeout=10).status_code == 403
    assert requests.get(proxy.url + "/echo/api/users", timeout=10).status_code == 200
    assert requests.get(proxy.url + "/echo/other", timeout=10).status_code == 404
    assert requests.get(proxy.url + "/echo/api/internal/x", timeout=10).status_code == 404


def test_security_headers_on_proxied_and_own_responses(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[security_headers]\ncontent_security_policy = default-src 'self'\n"
                                               "[rate_limit]\nlimit = 1/minute\n"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert r.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert r.headers["Content-Security-Policy"] == "default-src 'self'"
    assert "Strict-Transport-Security" not in r.headers  # plain HTTP
    assert "Permissions-Policy" not in r.headers
    denied = requests.get(proxy.url + "/echo", timeout=10)
    assert denied.status_code == 429 and denied.headers["X-Content-Type-Options"] == "nosniff"
    # Outside any route: a 400 of the proxy's own.
    data = raw_exchange(proxy.port, b"GET /../x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400") and b"X-Frame-Options: SAMEORIGIN" in data


def test_upstream_values_win_unless_override_and_listed_headers_go(start_proxy, upstream):
    proxy = start_proxy(limited(upstream.port, "[security_headers]\nremove = X-Kept\n"
                                               "[security_headers:strict]\noverride = yes\nframe_options = DENY\n")
                        + "\n[route:strict]\npath = /strict\nupstream = app\nstrip_prefix = yes\n"
                          "security_headers = strict\n")
    r = requests.get(proxy.url + "/hop", timeout=10)
    assert r.headers["X-Frame-Options"] == "SAMEORIGIN" and "X-Kept" not in r.headers
    r = requests.get(proxy.url + "/strict/hop", timeout=10)
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Kept"] == "yes"


def test_hsts_only_over_https(start_proxy, upstream):
    # A trusted proxy in front says the client came over HTTPS.
    proxy = start_proxy(limited(upstream.port, "[security_headers]\n"))
    r = requests.get(proxy.url + "/echo", headers={"X-Forwarded-Proto": "https"}, timeout=10)
    assert r.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
