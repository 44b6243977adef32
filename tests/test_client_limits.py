"""Client timeouts and limits from [server]: each violation gets its answer
(408, 414, 431, 429 or a closed connection), a log line, and frees what it held."""

from __future__ import annotations

import re
import socket
import time

import psutil
import pytest
import requests
from conftest import raw_exchange, read_until_closed, single_route
from h2client import RawH2

FAST = {"client_header_timeout": "1s", "client_timeout": "1s", "keepalive": "1s"}


def wait_for_open(upstream, condition, timeout: float = 10.0) -> None:
    """Until the upstream's count of open connections satisfies `condition`."""
    deadline = time.monotonic() + timeout
    while not condition(open_now := upstream.stats()["open"]):
        assert time.monotonic() < deadline, f"upstream has {open_now} connections open"
        time.sleep(0.05)


def test_incomplete_head_gets_408_at_the_header_timeout(start_proxy, upstream, hardening_record):
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        data, closed = read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.9 <= closed - started < 3
    proxy.wait_for_log(r"client 127\.0\.0\.1 sent no complete request head within 1s: 408")
    hardening_record(("incomplete request head (client_header_timeout 1s)", "1",
                      f"408 after {closed - started:.1f} s, logged"))


def test_slowloris_dribbling_the_head_is_cut_at_the_header_timeout(start_proxy, upstream, hardening_record):
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        started = time.monotonic()
        s.settimeout(0.1)
        cut = None
        for byte in head:  # a byte every 50 ms would take 5 s
            try:
                s.sendall(bytes([byte]))
                if s.recv(65536, socket.MSG_PEEK):
                    cut = time.monotonic()
                    break
            except socket.timeout:
                pass
            except OSError:
                cut = time.monotonic()
                break
        assert cut is not None and 0.9 <= cut - started < 3
    hardening_record(("head dribbled a byte every 50 ms (client_header_timeout 1s)", "1",
                      f"cut after {cut - started:.1f} s"))


def test_idle_keepalive_connection_is_closed_quietly(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        first = s.recv(65536)
        while not first.endswith(b"}"):  # the whole JSON answer
            first += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        idle_from = time.monotonic()
        data, closed = read_until_closed(s)
    assert data == b""  # no 408 for a connection that was merely idle
    assert 0.9 <= closed - idle_from < 3


def test_busy_keepalive_connection_outlives_the_keepalive_timeout(start_proxy, upstream):
    """The keep-alive deadline counts from the end of the last request,
    afresh each time, not from the first one."""
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    with requests.Session() as session:
        ports = set()
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            response = session.get(f"http://127.0.0.1:{proxy.port}/echo", stream=True)
            ports.add(response.raw._connection.sock.getsockname()[1])
            response.content
            time.sleep(0.3)
    assert len(ports) == 1  # one connection throughout


def test_keepalive_zero_serves_one_request_and_still_bounds_the_head(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server=dict(FAST, keepalive="0"))
    reply = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 ") == 1
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        data, _ = read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408 ")


def test_stalled_request_body_gets_408_and_the_upstream_sees_a_cut_request(start_proxy, start_upstream,
                                                                           hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        started = time.monotonic()
        # Above the size the proxy reads whole before sending: this streams.
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 200_000)
        data, closed = read_until_closed(s)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert closed - started < 8
    proxy.wait_for_log(r"client 127\.0\.0\.1 stalled mid-upload .*: 408")
    wait_for_open(upstream, lambda n: n == 1)  # 1: the stats request itself
    hardening_record(("request body stalls after 200 kB (client_timeout 1s)", "1",
                      f"408 after {closed - started:.1f} s; the upstream's connection closed"))


def test_body_trickling_below_min_body_rate_gets_408(start_proxy, start_upstream, hardening_record):
    upstream = start_upstream()
    # Each 64 KiB of body may take client_timeout (1 s) + 64 KiB at 64 KiB/s (1 s).
    proxy = start_proxy(single_route(upstream.port), server=dict(FAST, min_body_rate="64k"))
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        started = time.monotonic()
        s.settimeout(0.3)
        reply = b""
        while time.monotonic() - started < 6 and not reply:
            try:
                s.sendall(b"x")  # well within client_timeout each time
                reply = s.recv(65536)
            except socket.timeout:
                pass
            except OSError:
                break
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert 1.8 <= time.monotonic() - started < 4
    proxy.wait_for_log(r"stalled mid-upload \(body slower than min_body_rate")
    assert upstream.stats()["requests"] == 1  # this one: the upstream never saw the trickle
    hardening_record(("body trickled a byte every 0.3 s (min_body_rate 64k)", "1",
                      "408 after about 2 s; the upstream never saw the request"))


def test_client_that_never_reads_is_dropped_and_frees_the_upstream_connection(start_proxy, start_upstream,
                                                                              hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server=FAST)
    worker = proxy.workers()[0]
    rss_before = worker.memory_info().rss
    readers = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /bytes?n=200000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(s)
    try:
        wait_for_open(upstream, lambda n: n == 21)  # every reader's upstream connection, and this one
        wait_for_open(upstream, lambda n: n == 1)
        assert len(re.findall(r"did not read the response of GET /bytes for 1s: closed", proxy.log())) == 20
        # Held: the socket buffers and a chunk each, not the 200 MB bodies.
        assert worker.memory_info().rss - rss_before < 30 << 20
        assert requests.get(proxy.url + "/echo", timeout=5).status_code == 200
        hardening_record(("clients that never read a 200 MB response (client_timeout 1s)", "20",
                          f"all closed and logged, upstream connections freed, worker RSS "
                          f"+{(worker.memory_info().rss - rss_before) / 2**20:.1f} MiB"))
    finally:
        for s in readers:
            s.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", b"431"),
])
def test_request_line_and_header_limits(start_proxy, start_upstream, request_bytes, status, hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port))
    reply = raw_exchange(proxy.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
    proxy.wait_for_log(r"Invalid request from ip=127\.0\.0\.1")
    assert upstream.stats()["requests"] == 1  # this stats call only
    hardening_record((f"oversized request head ({len(request_bytes)} bytes)", "1",
                      f"{status.decode()}, logged, nothing forwarded"))


def fields(count: int, value: bytes = b"y") -> bytes:
    return b"".join(b"X-%d: %b\r\n" % (i, value) for i in range(count))


@pytest.mark.parametrize("count", [101, 150, 256, 257, 300, 1000, 100_000])
def test_too_many_header_fields_get_431_whatever_their_count(start_proxy, start_upstream, count,
                                                             hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port))
    head = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + fields(count, b"y" * 12) + b"\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        # The proxy answers while the client is still sending (2 MiB for the
        # largest head); the client sends it all, then reads the answer:
        # no reset on either side.
        for start in range(0, len(head), 65536):
            s.sendall(head[start:start + 65536])
            if start == 0:
                time.sleep(0.3)
        reply, _ = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"header" in reply.partition(b"\r\n\r\n")[2]
    proxy.wait_for_log(r"Invalid request from ip=127\.0\.0\.1: .*(header|fields)")
    assert upstream.stats()["requests"] == 1  # this stats call only
    # nginx has no count limit, only large_client_header_buffers (4 x 8k by default).
    nginx = "forwarded" if len(head) <= 32 << 10 else "400, past large_client_header_buffers"
    hardening_record((f"{count} request header fields ({len(head) // 1024} KiB head, max_headers 100)", "1",
                      f"431, the whole head read and dropped, no reset; nothing forwarded (nginx: {nginx})"))


def test_head_over_the_header_bytes_limit_gets_431(start_proxy, start_upstream):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server={"max_headers": "10", "max_header_size": "1k"})
    # A head that never ends: past what 10 fields of 1 KiB can take.
    head = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"z" * 300_000
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(head)
        reply, _ = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert upstream.stats()["requests"] == 1


@pytest.mark.parametrize("headers, status", [
    ([(f"x-{i}", "y") for i in range(101)], 431),
    ([(f"x-{i}", "y") for i in range(300)], 431),
    ([(f"x-{i}", "y" * 12) for i in range(1000)], 431),
    ([("x-big", "z" * 9000)], 431),
    ([(f"x-{i}", "z" * 2000) for i in range(50)], 431),  # 100 KiB: over the 64 KiB list size announced
    ([], 414),
])
def test_too_many_header_fields_over_http2_get_431(start_proxy, start_upstream, headers, status,
                                                   hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server={"http2": "yes", "http2_cleartext": "yes"})
    client = RawH2(proxy.port)
    try:
        path = "/echo" if headers else "/" + "a" * 9000
        answer = client.response(client.request("GET", path, headers=headers))
        # The connection goes on serving its other streams.
        after = client.response(client.request("GET", "/echo"))
    finally:
        client.close()
    assert answer["status"] == status and answer["ended"], answer
    assert answer["body"].endswith(b"\n") and len(answer["body"]) < 100
    assert after["status"] == 200
    proxy.wait_for_log(r"Invalid request from ip=127\.0\.0\.1 over HTTP/2: .*: %d" % status)
    assert upstream.stats()["requests"] == 2  # the second stream and this stats call
    if len(headers) > 1:
        size = sum(len(name) + len(value) + 32 for name, value in headers)
        hardening_record((f"{len(headers)} request header fields, {size // 1024} KiB, over HTTP/2 "
                          f"(max_headers 100, 64 KiB header list announced)", "1",
                          f"{status} on the stream, nothing forwarded, the connection kept "
                          f"(gunicorn alone: {'the connection closed' if size > 65536 else 'a reset stream'})"))


def test_header_list_past_four_times_the_announced_size_closes_the_http2_connection(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"http2": "yes", "http2_cleartext": "yes"})
    client = RawH2(proxy.port)
    try:
        client.request("GET", "/echo", headers=[(f"x-{i}", "z" * 4000) for i in range(80)])  # 320 KiB
        with pytest.raises(ConnectionError):
            client.response(1)
    finally:
        client.close()
    proxy.wait_for_log(r"HTTP/2 connection closed: .*header list larger than 262144")
    assert requests.get(proxy.url + "/echo", timeout=5).status_code == 200


def test_limits_are_configurable(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port),
                        server={"max_request_line": "300", "max_headers": "8", "max_header_size": "300"})
    assert raw_exchange(proxy.port, b"GET /" + b"a" * 400 + b" HTTP/1.1\r\nHost: x\r\n\r\n") \
        .startswith(b"HTTP/1.1 414 ")
    nine = b"".join(b"X-%d: y\r\n" % i for i in range(8))
    assert raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + nine + b"\r\n").startswith(b"HTTP/1.1 431 ")
    assert raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 400 + b"\r\n\r\n") \
        .startswith(b"HTTP/1.1 431 ")
    assert requests.get(proxy.url + "/echo", headers={"X-Ok": "y" * 200}, timeout=5).status_code == 200


def test_connections_per_client_address_are_capped(start_proxy, upstream, hardening_record):
    # 127.0.0.1 is an ordinary client here, not a trusted proxy.
    proxy = start_proxy(single_route(upstream.port),
                        server={"max_connections_per_ip": "3", "trusted_proxies": "192.0.2.1"})
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # accepted and counted
        with socket.create_connection(("127.0.0.1", proxy.port)) as extra:
            data, _ = read_until_closed(extra)
        assert data.startswith(b"HTTP/1.1 429 ") and b"Retry-After: 1" in data
        proxy.wait_for_log(r"client 127\.0\.0\.1 already holds 3 connections \(max_connections_per_ip\)")
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot is usable again
            reply = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if reply.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 200 ")
        hardening_record(("4th connection from one address (max_connections_per_ip 3)", "4",
                          "429 and closed, logged; served again once one closed"))
    finally:
        for s in held:
            s.close()


def test_behind_a_trusted_proxy_requests_are_capped_per_forwarded_client(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_connections_per_ip": "2"})
    slow = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(b"GET /slow?delay=3 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n")
        slow.append(s)
    try:
        time.sleep(0.5)
        over = requests.get(proxy.url + "/echo", headers={"X-Forwarded-For": "203.0.113.5"}, timeout=5)
        assert over.status_code == 429 and over.headers["Retry-After"] == "1"
        other = requests.get(proxy.url + "/echo", headers={"X-Forwarded-For": "203.0.113.6"}, timeout=5)
        assert other.status_code == 200
        proxy.wait_for_log(r"client 203\.0\.113\.5 \(via 127\.0\.0\.1\) already has 2 requests under way")
        for s in slow:
            s.settimeout(6)
            data = s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 ")
        again = requests.get(proxy.url + "/echo", headers={"X-Forwarded-For": "203.0.113.5"}, timeout=5)
        assert again.status_code == 200
    finally:
        for s in slow:
            s.close()


def test_out_of_file_descriptors_pauses_accepting_with_a_log_line(start_proxy, upstream, hardening_record):
    proxy = start_proxy(single_route(upstream.port))
    worker = proxy.workers()[0]
    baseline = worker.num_fds()
    worker.rlimit(psutil.RLIMIT_NOFILE, (baseline + 20, baseline + 20))
    flood = []
    try:
        for _ in range(60):
            flood.append(socket.create_connection(("127.0.0.1", proxy.port)))
        time.sleep(0.5)
        cpu_before = sum(worker.cpu_times()[:2])
        time.sleep(2)
        # gevent backs off (up to 1 s between tries): no busy loop.
        assert sum(worker.cpu_times()[:2]) - cpu_before < 0.5
        proxy.wait_for_log(r"out of file descriptors \(EMFILE\): not accepting new connections")
    finally:
        for s in flood:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            if requests.get(proxy.url + "/echo", timeout=3).status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the worker did not recover from EMFILE"
        time.sleep(0.2)
    assert worker.is_running() and worker.pid in [w.pid for w in proxy.workers()]
    hardening_record(("file descriptors run out (RLIMIT_NOFILE lowered, 60 connections)", "60",
                      "accepting paused with back-off and one log line a second, no busy loop, "
                      "served again after"))


def test_too_many_header_fields_with_a_body_following_over_http2(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"http2": "yes", "http2_cleartext": "yes"})
    client = RawH2(proxy.port)
    try:
        stream = client.request("POST", "/echo", headers=[(f"x-{i}", "y") for i in range(150)], end=False)
        answer = client.response(stream)
        after = client.response(client.request("GET", "/echo"))
    finally:
        client.close()
    # A complete 431, then the request's body is declined without error (RFC 9113 8.1).
    assert answer["status"] == 431 and answer["ended"] and after["status"] == 200
