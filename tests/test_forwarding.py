"""Requests reach the upstream and come back: pooling, balancing, headers."""

import json

import requests
from conftest import raw_exchange, single_route
from recording import recorder  # noqa: F401 (a fixture)


def test_proxied_request_reaches_upstream_and_returns(proxy, upstream):
    r = requests.post(proxy.url + "/echo/a?b=1", data=b"hello", timeout=10)
    assert r.status_code == 200
    echo = r.json()
    assert echo["method"] == "POST"
    assert echo["request_line"] == "POST /echo/a?b=1 HTTP/1.1"
    assert echo["body_length"] == 5
    assert r.headers["X-Request-ID"]


def test_pool_reuses_one_connection_for_sequential_requests(start_proxy, start_upstream):
    server = start_upstream()
    proxy = start_proxy(single_route(server.port))
    server.reset()
    with requests.Session() as client:
        for _ in range(100):
            assert client.get(proxy.url + "/echo", timeout=10).status_code == 200
    stats = server.stats()
    # 100 proxied requests plus this stats request, which opens its own connection.
    assert stats["requests"] == 101
    assert stats["connections"] == 2


def test_round_robin_spreads_requests_by_weight(start_proxy, start_upstream):
    a, b = start_upstream(), start_upstream()
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{a.port} 127.0.0.1:{b.port} weight=2
        [route:default]
        upstream = app
        """)
    ports = [requests.get(proxy.url + "/echo", timeout=10).json()["port"] for _ in range(30)]
    assert ports.count(str(a.port)) == 10
    assert ports.count(str(b.port)) == 20
    # Smooth: b never takes three turns in a row.
    assert all(ports[i:i + 3] != [str(b.port)] * 3 for i in range(len(ports) - 2))


def test_request_id_is_propagated_or_generated(proxy):
    r = requests.get(proxy.url + "/echo", headers={"X-Request-ID": "abc-123"}, timeout=10)
    assert r.headers["X-Request-ID"] == "abc-123"
    assert ["X-Request-Id", "abc-123"] in r.json()["headers"]
    r = requests.get(proxy.url + "/echo", headers={"X-Request-ID": "bad\tid"}, timeout=10)
    generated = r.headers["X-Request-ID"]
    assert len(generated) == 32 and generated != "bad\tid"
    assert ["X-Request-Id", generated] in r.json()["headers"]


def test_client_headers_pass_untouched_and_no_defaults_added(proxy):
    data = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: example.test\r\nX-Custom: A b  c\r\n"
                                    b"Connection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(json.loads(body)["headers"])
    assert headers["X-Custom"] == "A b  c"
    assert headers["Host"] == "example.test"
    assert "User-Agent" not in headers and "Accept-Encoding" not in headers


def test_options_asterisk_is_forwarded_as_asterisk(start_proxy, recorder):
    proxy = start_proxy(single_route(recorder.port))
    reply = raw_exchange(proxy.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"OPTIONS * HTTP/1.1")
    reply = raw_exchange(proxy.port, b"GET * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400")
    assert recorder.lines == [b"OPTIONS * HTTP/1.1"]


def test_trace_is_refused_unless_the_route_allows_it(start_proxy, recorder):
    proxy = start_proxy(single_route(recorder.port) + "[route:debug]\npath = /debug\nupstream = app\n"
                        "allow_trace = yes\n")
    for method in ("TRACE", "TRACK"):
        reply = raw_exchange(proxy.port, f"{method} /x HTTP/1.1\r\nHost: x\r\nCookie: s=1\r\n"
                                         "Connection: close\r\n\r\n".encode())
        assert reply.startswith(b"HTTP/1.1 405" if method == "TRACE" else b"HTTP/1.1 200"), reply[:60]
    reply = raw_exchange(proxy.port, b"TRACE /debug/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")
    assert recorder.lines == [b"TRACK /x HTTP/1.1", b"TRACE /debug/x HTTP/1.1"]
