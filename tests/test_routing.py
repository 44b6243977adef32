"""Routes by host and longest path prefix; nothing else is reachable."""

import pytest
import requests
from conftest import raw_exchange

from rproxy.routing import Router
from rproxy.target import TargetError, parse


def router():
    return Router([
        ((), "/", "default"),
        ((), "/api", "api"),
        ((), "/api/v2", "api-v2"),
        (("shop.example",), "/", "shop"),
        (("shop.example",), "/cart", "cart"),
        (("*.example",), "/", "wild"),
        (("*.eu.example",), "/", "wild-eu"),
    ])


@pytest.mark.parametrize("host,path,expected", [
    ("other", "/", "default"),
    ("other", "/api", "api"),
    ("other", "/api/", "api"),
    ("other", "/api/users", "api"),
    ("other", "/apix", "default"),          # whole segments only
    ("other", "/api/v2/x", "api-v2"),       # longest prefix wins
    ("shop.example", "/cart/1", "cart"),
    ("shop.example", "/", "shop"),
    ("a.example", "/", "wild"),
    ("a.b.example", "/x", "wild"),
    ("x.eu.example", "/", "wild-eu"),       # longest wildcard wins
    ("example", "/", "default"),            # the bare domain is not a sub-domain
])
def test_router_picks_most_specific_route(host, path, expected):
    assert router().match(host, path).target == expected


def test_host_routes_fall_back_to_less_specific_hosts():
    r = Router([(("api.example",), "/v1", "v1"), ((), "/", "default")])
    assert r.match("api.example", "/v1/x").target == "v1"
    assert r.match("api.example", "/other").target == "default"


def test_no_route_matches():
    assert Router([(("a.example",), "/", "a")]).match("b.example", "/") is None


@pytest.mark.parametrize("raw,normal", [
    ("/", "/"), ("/a/b", "/a/b"), ("//admin", "/admin"), ("/x/../admin", "/admin"),
    ("/%61dmin", "/admin"), ("/./admin/.", "/admin/"), ("/a//b/", "/a/b/"), ("", "/"),
])
def test_paths_are_normalised_for_matching(raw, normal):
    assert parse(raw or "/")[1] == normal


@pytest.mark.parametrize("raw", ["/../etc/passwd", "/a/%2e%2e/%2e%2e/x", "/a%00b"])
def test_malformed_paths_are_bad_requests(raw):
    with pytest.raises(TargetError):
        parse(raw)


ROUTES = """
    [upstream:app]
    servers = 127.0.0.1:{port}
    [route:default]
    upstream = app
    [route:api]
    path = /api
    upstream = app
    strip_prefix = yes
    [route:admin]
    host = admin.example *.admin.example
    path = /
    upstream = app
    host_header = admin-backend
    """


@pytest.fixture
def routed(start_proxy, upstream):
    return start_proxy(ROUTES.format(port=upstream.port))


def request_line(proxy, path, **kw):
    return requests.get(proxy.url + path, timeout=10, **kw).json()["request_line"]


def test_strip_prefix_removes_the_matched_prefix(routed):
    assert request_line(routed, "/api/echo/x?q=1") == "GET /echo/x?q=1 HTTP/1.1"
    assert request_line(routed, "/api") == "GET / HTTP/1.1"


def test_without_strip_prefix_the_raw_target_goes_upstream(routed):
    assert request_line(routed, "/echo/a%2Fb/c%20d?x=%20") == "GET /echo/a%2Fb/c%20d?x=%20 HTTP/1.1"


def test_host_routes_e2e(routed):
    r = requests.get(routed.url + "/echo", headers={"Host": "x.admin.example:8080"}, timeout=10)
    assert ["Host", "admin-backend"] in r.json()["headers"]


def test_no_matching_route_gives_404(start_proxy, upstream):
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{upstream.port}
        [route:only]
        host = only.example
        upstream = app
        """)
    r = requests.get(proxy.url + "/echo", headers={"Host": "other.example"}, timeout=10)
    assert r.status_code == 404 and "no route" in r.text and len(r.content) < 200


def test_absolute_form_target_is_not_an_open_proxy(start_proxy, upstream):
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{upstream.port}
        [route:only]
        host = site.example
        upstream = app
        """)
    # A host no route names: 404, nothing is fetched from it.
    data = raw_exchange(proxy.port, b"GET http://127.0.0.1:9/echo HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404 ")
    # A host a route names: its authority replaces Host, the path goes to the route's upstream.
    data = raw_exchange(proxy.port, b"GET http://site.example/echo?a=1 HTTP/1.1\r\nHost: evil.example\r\n"
                      b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b'"request_line": "GET /echo?a=1 HTTP/1.1"' in data
    assert b'["Host", "site.example"]' in data


def test_connect_is_refused(routed):
    data = raw_exchange(routed.port, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    assert data.split(b" ")[1] in (b"400", b"405")


def test_traversal_and_nul_get_400(routed):
    for target in (b"/../../etc/passwd", b"/a%00b"):
        data = raw_exchange(routed.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 "), data
