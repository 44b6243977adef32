"""Hop-by-hop headers go nowhere; forwarding headers say who the client is,
believed only from trusted proxies."""

import json

import requests
from conftest import raw_exchange, single_route
from test_http2 import client, https, tls


def upstream_headers(response) -> dict:
    return {k.lower(): v for k, v in response.json()["headers"]}


def test_hop_by_hop_request_headers_are_removed(proxy):
    r = requests.get(proxy.url + "/echo", timeout=10, headers={
        "Connection": "keep-alive, X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic Zm9v", "Upgrade": "h2c",
        "X-Kept": "yes"})
    seen = upstream_headers(r)
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "upgrade", "trailer"):
        assert name not in seen, name
    assert seen["x-kept"] == "yes"
    assert seen.get("connection", "keep-alive").lower() == "keep-alive"  # urllib3's own


def test_hop_by_hop_response_headers_are_removed(proxy):
    r = requests.get(proxy.url + "/hop", timeout=10)
    assert r.text == "hop"
    for name in ("X-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert name not in r.headers, name
    assert r.headers["X-Kept"] == "yes"


def test_forwarding_headers_are_added(proxy):
    r = requests.get(proxy.url + "/echo", headers={"Host": "shop.example"}, timeout=10)
    seen = upstream_headers(r)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "shop.example"
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["host"] == "shop.example"


def test_trusted_proxy_headers_are_kept_and_extended(proxy):
    r = requests.get(proxy.url + "/echo", timeout=10, headers={
        "X-Forwarded-For": "203.0.113.7, 10.0.0.2", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "public.example", "X-Real-IP": "203.0.113.7"})
    seen = upstream_headers(r)
    assert seen["x-forwarded-for"] == "203.0.113.7, 10.0.0.2, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "public.example"
    assert seen["x-real-ip"] == "203.0.113.7"


def test_untrusted_peer_cannot_forge_forwarding_headers(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"trusted_proxies": "10.1.2.3"})
    r = requests.get(proxy.url + "/echo", timeout=10, headers={
        "X-Forwarded-For": "1.2.3.4", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil",
        "X-Real-IP": "1.2.3.4", "Forwarded": "for=1.2.3.4", "Host": "site.example"})
    seen = upstream_headers(r)
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "site.example"
    assert seen["x-real-ip"] == "127.0.0.1"
    assert "forwarded" not in seen


def test_several_set_cookie_headers_survive_intact(proxy):
    data = raw_exchange(proxy.port, b"GET /cookies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    cookies = [line.split(b": ", 1)[1] for line in data.split(b"\r\n")
               if line.lower().startswith(b"set-cookie:")]
    assert cookies == [b"a=1; Path=/", b"b=2; HttpOnly",
                       b"c=3, with comma; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]


def test_host_header_can_be_set_per_route(start_proxy, upstream):
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{upstream.port}
        [route:default]
        upstream = app
        [route:fixed]
        path = /echo/fixed
        upstream = app
        host_header = internal.example
        [route:up]
        path = /echo/up
        upstream = app
        host_header = upstream
        """)
    assert upstream_headers(requests.get(proxy.url + "/echo/fixed", timeout=10))["host"] == "internal.example"
    assert upstream_headers(requests.get(proxy.url + "/echo/up", timeout=10))["host"] == f"127.0.0.1:{upstream.port}"


def test_malformed_upstream_header_is_dropped_not_passed_on(proxy):
    r = requests.get(proxy.url + "/bad-header", timeout=10)
    assert r.status_code == 200 and r.text == "ok"
    assert "X-Bad" not in r.headers and r.headers["X-Good"] == "fine"
    assert "dropped a malformed response header 'X-Bad'" in proxy.log()


def test_a_trusted_proxys_forwarding_headers_are_believed_only_when_well_formed(proxy):
    # 127.0.0.1 is a trusted proxy by default.
    good = upstream_headers(requests.get(proxy.url + "/echo", timeout=10, headers={
        "Host": "shop.example", "X-Forwarded-Host": "www.shop.example, lb.example:8443",
        "X-Forwarded-Proto": "https"}))
    assert good["x-forwarded-host"] == "www.shop.example, lb.example:8443"
    assert good["x-forwarded-proto"] == "https"
    bad = upstream_headers(requests.get(proxy.url + "/echo", timeout=10, headers={
        "Host": "shop.example", "X-Forwarded-Host": "evil.example/path?x=<script>",
        "X-Forwarded-Proto": "javascript"}))
    assert bad["x-forwarded-host"] == "shop.example"
    assert bad["x-forwarded-proto"] == "http"


# What a client tries next when X-Forwarded-For is replaced: the other names
# applications read the client's address, scheme or URL from.
SPOOFED = [("X-Client-IP", "1.1.1.1"), ("true-client-ip", "1.1.1.2"), ("CF-CONNECTING-IP", "1.1.1.3"),
           ("Fastly-Client-IP", "1.1.1.4"), ("X-Cluster-Client-IP", "1.1.1.5"), ("X-Originating-IP", "1.1.1.6"),
           ("X-Remote-IP", "1.1.1.7"), ("X-Remote-Addr", "1.1.1.8"), ("Client-IP", "1.1.1.9"),
           ("X_Client_IP", "1.1.1.10"), ("True_Client_IP", "1.1.1.11"), ("X-Original-URL", "/admin"),
           ("X-Rewrite-URL", "/admin"), ("X-Forwarded-Prefix", "/evil"), ("X-Forwarded-Server", "evil"),
           ("X-Forwarded-Scheme", "https"), ("X-Forwarded-Ssl", "on"), ("X-Forwarded-Port", "443")]


def untrusted(start_proxy, upstream, **server):
    return start_proxy(single_route(upstream.port), server={"trusted_proxies": "10.1.2.3", **server})


def forged_request(host: str) -> bytes:
    lines = [f"{name}: {value}" for name, value in SPOOFED]
    lines.append("X-Client-IP: 1.1.1.12")  # said twice
    return ("GET /echo HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n"
            + "\r\n".join(lines) + "\r\n\r\n").encode()


def echoed_headers(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return {k.lower(): v for k, v in json.loads(body)["headers"]}


def assert_no_spoofed_header_arrived(seen: dict) -> None:
    for name, _ in SPOOFED:
        lower = name.lower()
        assert lower not in seen and lower.replace("_", "-") not in seen, (name, seen)
    assert not any(value.startswith("1.1.1.") for value in seen.values()), seen
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-real-ip"] == "127.0.0.1"


def test_untrusted_client_cannot_send_any_client_ip_header(start_proxy, upstream, hardening_record):
    proxy = untrusted(start_proxy, upstream)
    seen = echoed_headers(raw_exchange(proxy.port, forged_request("site.example")))
    assert_no_spoofed_header_arrived(seen)
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == "site.example"
    hardening_record(("client-address, URL and X-Forwarded-* headers from an untrusted peer, HTTP/1.1 "
                      "(any case, underscores, one sent twice)", f"{len(SPOOFED) + 1} headers",
                      "none reached the upstream; X-Forwarded-For and X-Real-IP = the peer"))


def test_untrusted_client_cannot_send_them_over_http2(start_proxy, upstream, certs, hardening_record):
    proxy = untrusted(start_proxy, upstream, **tls(certs))
    with client(certs) as c:
        r = c.get(https(proxy) + "/echo", headers=[(n.lower(), v) for n, v in SPOOFED])
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert_no_spoofed_header_arrived({k.lower(): v for k, v in r.json()["headers"]})
    hardening_record(("the same headers over HTTP/2", f"{len(SPOOFED)} headers", "none reached the upstream"))


def test_a_trusted_proxy_may_send_them(proxy):
    headers = {"True-Client-IP": "203.0.113.9", "CF-Connecting-IP": "203.0.113.9",
               "X-Forwarded-Prefix": "/shop"}
    seen = upstream_headers(requests.get(proxy.url + "/echo", headers=headers, timeout=10))
    assert seen["true-client-ip"] == "203.0.113.9" and seen["cf-connecting-ip"] == "203.0.113.9"
    assert seen["x-forwarded-prefix"] == "/shop"
    # gunicorn drops names with underscores, whoever sends them, rather than
    # read X_Client_IP as X-Client-IP.
    data = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                    b"X_Client_IP: 203.0.113.9\r\n\r\n")
    assert not any(value == "203.0.113.9" for value in echoed_headers(data).values())


def test_the_stripped_list_is_configurable(start_proxy, upstream):
    proxy = untrusted(start_proxy, upstream, spoofable_headers="X-Tenant")
    seen = upstream_headers(requests.get(proxy.url + "/echo", timeout=10, headers={
        "x-tenant": "other", "True-Client-IP": "1.1.1.1", "X-Forwarded-Prefix": "/evil"}))
    assert "x-tenant" not in seen and "x-forwarded-prefix" not in seen
    assert seen["true-client-ip"] == "1.1.1.1"  # no longer listed


def test_untrusted_client_cannot_pick_its_rate_limit_key(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port) + "\n[rate_limit]\nlimit = 2/minute\n"
                                                      "key = header:True-Client-IP\n",
                        server={"trusted_proxies": "10.1.2.3"})
    codes = [requests.get(proxy.url + "/echo", headers={"True-Client-IP": f"198.51.100.{i}"},
                          timeout=10).status_code for i in range(4)]
    assert codes == [200, 200, 429, 429]  # counted by its own address, whatever it claims
