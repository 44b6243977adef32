"""A streamed response that waits on its upstream for a second is parked (no
greenlet while it waits, io watchers on both sockets): for its client nothing
changes. Every event still arrives, in order, with the response's end; the
connection then serves its next request; a client that leaves frees the
upstream connection; a silent upstream is cut at read_timeout; a stop lets parked streams go on
until graceful_timeout, as running ones; limits still count them."""

from __future__ import annotations

import os
import signal
import socket
import time

import requests
from conftest import read_until_closed, read_until_ending, silent_for, single_route

HELD = r"response to 127\.0\.0\.1 waits on its upstream: parked"


def read_chunked_to_end(sock: socket.socket) -> bytes:
    """A whole chunked response (through its last chunk), or what came before the close."""
    return read_until_ending(sock, b"\r\n0\r\n\r\n", 20.0)


def open_parked_stream(proxy, key: str, close: bool = False) -> socket.socket:
    """A client of /sse?key=`key` whose stream is parked (its first event in, the proxy's log says so)."""
    count = len(proxy.log_lines(HELD)) + 1
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=15)
    connection = b"Connection: close\r\n" if close else b""
    s.sendall(b"GET /sse?key=%s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (key.encode(), connection))
    s.settimeout(10)
    assert b"data: first" in s.recv(65536)
    proxy.wait_for_log(HELD, count=count)
    return s


def test_held_stream_gets_every_event_in_order_and_its_end_across_parks(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port))
    with requests.get(proxy.url + "/ticks?n=4&every=1.6", stream=True, timeout=15) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
        events, arrived = [], []
        for line in r.iter_lines():
            if line:
                events.append(line)
                arrived.append(time.monotonic())
    assert events == [b"data: tick 0", b"data: tick 1", b"data: tick 2", b"data: tick 3"]
    # each event as it was sent, not held back until the next one
    assert all(later - earlier > 1.0 for earlier, later in zip(arrived, arrived[1:])), arrived
    assert len(proxy.wait_for_log(HELD, count=3)) >= 3  # parked in each wait
    proxy.wait_for_log(r'"GET /ticks\?n=4&every=1.6 HTTP/1.1" 200 ')
    line = proxy.log_lines(r'"GET /ticks\?n=4&every=1.6 HTTP/1.1" 200 ')
    assert len(line) == 1 and "error=" not in line[0], line
    total_ms = float(line[0].split("ms upstream=")[0].rsplit(" ", 1)[1])
    assert total_ms > 4000, line  # the whole request's time, not the last relay's


def test_connection_of_a_parked_stream_serves_its_next_request(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "10s"})
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as s:
        s.sendall(b"GET /ticks?n=2&every=1.8 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_chunked_to_end(s)
        assert first.startswith(b"HTTP/1.1 200 ") and b"data: tick 1" in first, first
        assert proxy.log_lines(HELD)
        s.sendall(b"GET /echo/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        second, _ = read_until_closed(s, 10.0)
    assert second.startswith(b"HTTP/1.1 200 ") and b"/echo/after" in second, second


def test_request_pipelined_while_a_stream_is_parked_is_served_after_it(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "10s"})
    key = f"sse-next-{time.monotonic_ns()}"
    with open_parked_stream(proxy, key) as s:
        s.sendall(b"GET /echo/pipelined HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(1.0)
        requests.get(upstream.url + f"/release?key={key}", timeout=5)
        data, _ = read_until_closed(s, 15.0, b"<reset>")
    first, _, second = data.partition(b"\r\n0\r\n\r\n")
    assert b"data: second" in first, data
    assert second.startswith(b"HTTP/1.1 200 ") and b"/echo/pipelined" in second, data


def one_connection_upstream(start_proxy, upstream, **server):
    return start_proxy(single_route(upstream.port, upstream_extra="max_connections = 1\nconnect_timeout = 10s"),
                       server=server or None)


def test_client_leaving_a_parked_stream_frees_its_upstream_connection(start_proxy, upstream):
    proxy = one_connection_upstream(start_proxy, upstream)
    key = f"sse-parked-{time.monotonic_ns()}"  # never released: the upstream holds it 20 s
    with requests.get(proxy.url + f"/sse?key={key}", stream=True, timeout=10) as r:
        assert next(r.iter_lines()) == b"data: first"
        proxy.wait_for_log(HELD)
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo/next", timeout=15)
    assert r.status_code == 200 and time.monotonic() - started < 5, (r.status_code, time.monotonic() - started)
    proxy.wait_for_log(r'"GET /sse\?key=sse-parked-\d+ HTTP/1.1" 200 .*error="client left mid-response"')


def test_silent_upstream_past_read_timeout_cuts_a_parked_stream(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port, upstream_extra="read_timeout = 3s"))
    key = f"sse-silent-{time.monotonic_ns()}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as s:
        s.sendall(f"GET /sse?key={key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        started = time.monotonic()
        data, closed = read_until_closed(s, 15.0, b"<reset>")
    assert data.startswith(b"HTTP/1.1 200 ") and b"data: first" in data, data
    assert not data.endswith(b"\r\n0\r\n\r\n")  # cut, never a complete-looking end
    assert 2.5 < closed - started < 9, closed - started
    assert proxy.log_lines(HELD)
    proxy.wait_for_log(r'"GET /sse\?key=sse-silent-\d+ HTTP/1.1" 200 .*error="upstream cut mid-body')


def test_stop_lets_a_parked_stream_finish_within_graceful_timeout(start_proxy, upstream):
    """As a running stream does: a TERM to the worker resumes the parked
    stream, which gets its next event and its end before the worker exits."""
    proxy = start_proxy(single_route(upstream.port), server={"graceful_timeout": "30s"})
    key = f"sse-stop-{time.monotonic_ns()}"
    with open_parked_stream(proxy, key) as s:
        [worker] = proxy.workers()
        stop_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # the worker has stopped its listener by now
        requests.get(upstream.url + f"/release?key={key}", timeout=5)
        data, closed = read_until_closed(s, 15.0, b"<reset>")
        worker.wait(15)
    assert b"data: second" in data and data.endswith(b"\r\n0\r\n\r\n"), data
    assert closed - stop_at < 10
    line = proxy.wait_for_log(r'"GET /sse\?key=sse-stop-\d+ HTTP/1.1" 200 ')
    assert "error=" not in line[0], line
    assert "graceful timeout" not in proxy.log().lower()


def test_reload_cuts_a_parked_stream_when_graceful_timeout_ends(start_proxy, upstream):
    """An upstream still silent at graceful_timeout: the stream is cut then,
    and the old worker exits, in bounded time."""
    proxy = start_proxy(single_route(upstream.port), server={"graceful_timeout": "3s"})
    key = f"sse-hup-{time.monotonic_ns()}"  # never released: the upstream holds it 20 s
    with open_parked_stream(proxy, key) as s:
        [old] = proxy.workers()
        reload_at = time.monotonic()
        os.kill(proxy.pid, signal.SIGHUP)
        data, closed = read_until_closed(s, 20.0, b"<reset>")
        old.wait(15)
    assert not data.endswith(b"\r\n0\r\n\r\n"), data  # cut, never a complete-looking end
    assert 2.0 < closed - reload_at < 12, closed - reload_at
    proxy.wait_for_log(r'"GET /sse\?key=sse-hup-\d+ HTTP/1.1" 200 .*error="worker stopping"')
    assert requests.get(proxy.url + "/echo/fresh", timeout=10).status_code == 200  # the new worker serves


def test_parked_streams_still_count_against_worker_connections(start_proxy, upstream):
    """Two parked streams hold a worker's two connections: a third client
    is served only once one of them ends."""
    proxy = start_proxy(single_route(upstream.port), server={"worker_connections": "2"})
    keys = [f"sse-slots-{n}-{time.monotonic_ns()}" for n in (1, 2)]
    held = [open_parked_stream(proxy, key, close=True) for key in keys]
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as third:
            third.sendall(b"GET /echo/third HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert silent_for(third, 1.5), "a third client was served while two streams were parked"
            requests.get(upstream.url + f"/release?key={keys[0]}", timeout=5)
            ended, _ = read_until_closed(held[0], 10.0)
            assert ended.endswith(b"\r\n0\r\n\r\n"), ended
            answer, _ = read_until_closed(third, 10.0)
            assert answer.startswith(b"HTTP/1.1 200 ") and b"/echo/third" in answer, answer
    finally:
        requests.get(upstream.url + f"/release?key={keys[1]}", timeout=5)
        for s in held:
            s.close()


def test_client_closing_behind_pipelined_bytes_frees_a_parked_streams_upstream(start_proxy, upstream):
    """A client that sends its next request while the stream is parked, then
    closes: its close is still seen, and the upstream connection freed."""
    proxy = one_connection_upstream(start_proxy, upstream)
    key = f"sse-pipelined-{time.monotonic_ns()}"  # never released: the upstream holds it 20 s
    with open_parked_stream(proxy, key) as s:
        s.sendall(b"GET /echo/pipelined HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.0)  # the proxy sees the bytes alone first
        s.shutdown(socket.SHUT_WR)
        proxy.wait_for_log(r'"GET /sse\?key=sse-pipelined-\d+ HTTP/1.1" 200 .*error="client left mid-response"',
                           timeout=8)
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo/next", timeout=15)
    assert r.status_code == 200 and time.monotonic() - started < 5, (r.status_code, time.monotonic() - started)


def test_parked_streams_still_count_against_max_connections_per_ip(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_connections_per_ip": "1"})
    key = f"sse-limit-{time.monotonic_ns()}"
    with open_parked_stream(proxy, key) as s:
        assert requests.get(proxy.url + "/echo", timeout=10).status_code == 429
        requests.get(upstream.url + f"/release?key={key}", timeout=5)
        assert b"data: second" in read_chunked_to_end(s)


def test_stream_that_would_park_as_the_worker_stops_goes_on_past_keepalive(start_proxy, upstream):
    """Stopped during its first wait, the stream is relayed on in its own
    greenlet: no keep-alive deadline of its connection cuts it meanwhile."""
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "2s", "graceful_timeout": "30s"})
    key = f"sse-stopping-{time.monotonic_ns()}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as s:
        s.sendall(f"GET /sse?key={key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.settimeout(10)
        assert b"data: first" in s.recv(65536)
        [worker] = proxy.workers()
        worker.send_signal(signal.SIGTERM)  # within the first wait, before it would park
        time.sleep(4.5)  # past the connection's keep-alive time
        requests.get(upstream.url + f"/release?key={key}", timeout=5)
        data, _ = read_until_closed(s, 15.0, b"<reset>")
        worker.wait(15)
    assert b"data: second" in data and data.endswith(b"\r\n0\r\n\r\n"), data
    line = proxy.wait_for_log(r'"GET /sse\?key=sse-stopping-\d+ HTTP/1.1" 200 ')
    assert "error=" not in line[0], line


def test_stream_resumed_by_a_stop_is_cut_at_the_end_of_its_read_timeout(start_proxy, upstream):
    """Its upstream's wait goes on from where it was when the stop came,
    not from the start of a new read_timeout."""
    proxy = start_proxy(single_route(upstream.port, upstream_extra="read_timeout = 6s"),
                        server={"graceful_timeout": "30s"})
    key = f"sse-stop-silent-{time.monotonic_ns()}"  # never released: the upstream holds it 20 s
    with open_parked_stream(proxy, key) as s:
        first_at = time.monotonic()
        time.sleep(3.0)
        [worker] = proxy.workers()
        worker.send_signal(signal.SIGTERM)
        data, closed = read_until_closed(s, 20.0, b"<reset>")
        worker.wait(15)
    assert not data.endswith(b"\r\n0\r\n\r\n"), data
    assert closed - first_at < 8.5, closed - first_at  # not 3 + 6 s
    proxy.wait_for_log(r'"GET /sse\?key=sse-stop-silent-\d+ HTTP/1.1" 200 .*error="upstream cut mid-body')
