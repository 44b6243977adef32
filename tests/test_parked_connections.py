"""A keep-alive connection idle for a second is parked (no greenlet, an io
watcher on its socket): for its client nothing changes. Its next requests
are served, the keepalive timeout still ends it quietly, it still counts
against max_connections_per_ip and worker_connections, a dribbled head
still meets its deadline, and a stop or reload closes it at once."""

from __future__ import annotations

import os
import signal
import socket
import time

from conftest import raw_exchange, read_until_closed, read_until_ending, silent_for, single_route

PARKED = r"keep-alive connection from 127\.0\.0\.1 idle: parked"
REQUEST = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One whole /echo response (a JSON body), or what came before the close."""
    return read_until_ending(sock, b"}")


def parked_connection(proxy, count: int = 1) -> socket.socket:
    """A connection that was served once, then parked (the proxy's log says so)."""
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(REQUEST)
    assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    proxy.wait_for_log(PARKED, count=count)
    return sock


def test_parked_connection_serves_its_next_requests_and_pipelined_ones(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "10s"})
    with parked_connection(proxy) as s:
        s.sendall(REQUEST)
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        proxy.wait_for_log(PARKED, count=2)  # parked again
        s.sendall(REQUEST * 3)  # pipelined: all three answered, in order
        answers = b""
        while answers.count(b"HTTP/1.1 200 ") < 3 or not answers.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, answers
            answers += chunk
    assert answers.count(b"HTTP/1.1 200 ") == 3


def test_parked_connection_is_closed_quietly_at_the_keepalive_timeout(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "3s"})
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(REQUEST)
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        idle_from = time.monotonic()
        data, closed = read_until_closed(s, 15.0, b"<reset>")
    assert data == b""  # no 408 for a connection that was merely idle
    assert 2.9 <= closed - idle_from < 6
    assert proxy.log_lines(PARKED)


def test_head_dribbled_into_a_parked_connection_meets_the_keepalive_deadline(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "3s", "client_header_timeout": "3s"})
    with parked_connection(proxy) as s:
        idle_from = time.monotonic()  # about: the response ended a little earlier
        s.sendall(b"GET /echo HTTP/1.1\r\n")
        s.settimeout(0.3)
        closed = None
        for _ in range(40):  # a header byte every 0.3 s, never the end of the head
            try:
                s.sendall(b"X")
                if s.recv(65536) == b"":
                    closed = time.monotonic()
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = time.monotonic()
                break
    assert closed is not None, "the dribbling client was never cut"
    assert closed - idle_from < 5


def test_parked_connections_still_count_against_max_connections_per_ip(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port),
                        server={"keepalive": "20s", "max_connections_per_ip": "2", "trusted_proxies": "192.0.2.1"})
    held = [parked_connection(proxy, count) for count in (1, 2)]
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as extra:
            data, _ = read_until_closed(extra, 15.0, b"<reset>")
        assert data.startswith(b"HTTP/1.1 429 ")
        held.pop().close()  # the parked connection's close frees its count
        deadline = time.monotonic() + 10
        while True:  # the freed count is usable again (once the worker has seen the close)
            reply = raw_exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if reply.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()


def test_parked_connections_still_count_against_worker_connections(start_proxy, upstream):
    """nginx's keep-alive connections count against its worker_connections;
    parked ones do here: the worker accepts no third client until one goes."""
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "20s", "worker_connections": "2"})
    held = [parked_connection(proxy, count) for count in (1, 2)]
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as third:
            third.sendall(REQUEST)
            assert silent_for(third, 1.5), "a third client was served while two connections were parked"
            held.pop().close()
            assert read_response(third).startswith(b"HTTP/1.1 200 ")
        # A parked connection's slot goes back to it when its next request comes.
        held[0].sendall(REQUEST)
        assert read_response(held[0]).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()


def test_stop_closes_parked_connections_without_waiting_for_graceful_timeout(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "60s", "graceful_timeout": "30s"})
    with parked_connection(proxy, 1) as idle, parked_connection(proxy, 2) as busy:
        stop_at = time.monotonic()
        # The next request of one of them arrives with the stop: answered, or closed cleanly.
        busy.sendall(REQUEST)
        os.kill(proxy.pid, signal.SIGTERM)
        data, closed = read_until_closed(idle, 15.0, b"<reset>")
        assert data == b""
        answer, _ = read_until_closed(busy, 15.0, b"<reset>")
        assert answer == b"" or (answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"}")), answer
        proxy.proc.wait(15)
    assert closed - stop_at < 5
    assert time.monotonic() - stop_at < 10


def test_reload_closes_parked_connections_of_the_old_worker_at_once(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"keepalive": "60s", "graceful_timeout": "30s"})
    with parked_connection(proxy) as s:
        reload_at = time.monotonic()
        os.kill(proxy.pid, signal.SIGHUP)
        data, closed = read_until_closed(s, 15.0, b"<reset>")
    assert data == b""
    assert closed - reload_at < 5
    with socket.create_connection(("127.0.0.1", proxy.port)) as fresh:  # the new worker serves
        fresh.sendall(REQUEST)
        assert read_response(fresh).startswith(b"HTTP/1.1 200 ")
