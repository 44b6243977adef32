"""What the client sees when the upstream, or the client itself, fails."""

import socket
import time

import pytest
import requests
from conftest import free_port, single_route


def test_connection_refused_gives_502_with_short_body(start_proxy):
    proxy = start_proxy(single_route(free_port()))
    r = requests.get(proxy.url + "/", timeout=10)
    assert r.status_code == 502
    assert "refused" in r.text and r.headers["X-Request-ID"] in r.text
    r = requests.get(proxy.url + "/", headers={"Accept": "application/json"}, timeout=10)
    assert r.status_code == 502
    body = r.json()
    assert body["status"] == 502 and body["request_id"] == r.headers["X-Request-ID"]
    assert "refused" in proxy.log() and body["request_id"] in proxy.log()


@pytest.fixture
def blackhole():
    """A port whose accept queue is full, so that new connections hang in SYN."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    yield listener.getsockname()[1]
    for s in fillers:
        s.close()
    listener.close()


def test_connect_timeout_gives_504(start_proxy, blackhole):
    proxy = start_proxy(single_route(blackhole, upstream_extra="connect_timeout = 500ms"))
    started = time.monotonic()
    r = requests.get(proxy.url + "/", timeout=10)
    assert r.status_code == 504
    assert "within 0.5s" in r.text
    assert time.monotonic() - started < 5


def test_read_timeout_before_head_gives_504_per_route_override(start_proxy, upstream):
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{upstream.port}
        read_timeout = 10s
        [route:default]
        upstream = app
        [route:impatient]
        path = /slow
        upstream = app
        read_timeout = 300ms
        """)
    r = requests.get(proxy.url + "/slow?delay=2", timeout=10)
    assert r.status_code == 504 and "no response within 0.3s" in r.text
    # The same upstream through the patient route answers.
    r = requests.get(proxy.url + "/echo/slow", timeout=10)
    assert r.status_code == 200


def test_malformed_response_gives_502(proxy):
    r = requests.get(proxy.url + "/malformed", timeout=10)
    assert r.status_code == 502 and "malformed" in r.text


def test_upstream_hanging_up_without_answer_gives_502(proxy):
    r = requests.get(proxy.url + "/hangup", timeout=10)
    assert r.status_code == 502 and "without a response" in r.text


@pytest.mark.parametrize("endpoint", ["/abort?n=200000", "/abort-chunked?n=200000"])
def test_upstream_dying_mid_body_cuts_the_client(proxy, endpoint):
    with requests.get(proxy.url + endpoint, stream=True, timeout=10) as r:
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in r.iter_content(65536):
                pass
    time.sleep(0.2)
    log = proxy.log()
    assert "cut the response mid-body" in log
    assert "Traceback" not in log
    # The broken upstream connection was not pooled: the next request is fine.
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200


def test_client_disconnecting_mid_upload_aborts_upstream_request(start_proxy, start_upstream):
    server = start_upstream()
    proxy = start_proxy(single_route(server.port))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        s.sendall(b"x" * 500_000)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while "went away mid-upload" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "went away mid-upload" in proxy.log()
    assert " 499 " in proxy.log()
    # The upstream saw no complete request, and the half-sent connection was
    # discarded: the next request goes on a new connection and succeeds.
    server.reset()
    r = requests.post(proxy.url + "/upload", data=b"y" * 1000, timeout=10)
    assert r.json()["body_length"] == 1000
    assert server.stats()["requests"] == 2  # that upload and the stats call


def test_body_over_max_body_size_gives_413_without_reading_it(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_body_size": "1m"})
    upstream.reset()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n")
        s.sendall(b"z" * 65536)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 413 ")
    assert upstream.stats()["requests"] == 1  # only the stats call: nothing forwarded


def test_chunked_body_over_max_body_size_gives_413(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_body_size": "1m"})

    def body():
        for _ in range(100):
            yield b"q" * 65536
    try:
        r = requests.post(proxy.url + "/upload", data=body(), timeout=10)
    except requests.exceptions.ConnectionError:
        pytest.fail("the 413 should reach the client before the connection closes")
    assert r.status_code == 413


def test_pooled_connection_closed_by_restarted_upstream_is_not_a_502(start_proxy, start_upstream):
    server = start_upstream()
    proxy = start_proxy(single_route(server.port))
    with requests.Session() as client:
        for method in ("GET", "POST"):
            assert client.request(method, proxy.url + "/echo", data=b"a", timeout=10).status_code == 200
            port = server.port
            server.stop()
            server = start_upstream(port)
            r = client.request(method, proxy.url + "/echo", data=b"b", timeout=10)
            assert r.status_code == 200, r.text


def test_upstream_answering_early_is_relayed(proxy):
    data = b"w" * (4 << 20)
    r = requests.post(proxy.url + "/early-reply", data=data, timeout=10)
    assert r.status_code == 413 and r.json() == {"early": True}
