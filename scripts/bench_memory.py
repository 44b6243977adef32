"""Memory per connection, for scripts/bench.py: the growth of one worker's
RSS with N connections open, divided by N.

- idle keep-alive client: a connection that made one request (100 bytes)
  and then stays open, silent;
- held streaming response: a request whose response has started (head and
  first chunk received) and whose end the upstream holds back, as an event
  stream or long poll does;
- many clients: `clients` keep-alive connections to one rproxy worker at
  once, then one request on each: how many get their answer.

The client side is this process, with non-blocking sockets and a selector.
"""

from __future__ import annotations

import selectors
import socket
import time

from bench_common import raise_fd_limit, rss_kib, say, worker_pid

SMALL_REQUEST = b"GET /100B HTTP/1.1\r\nHost: bench\r\n\r\n"
HOLD_REQUEST = b"GET /hold?s=120 HTTP/1.1\r\nHost: bench\r\n\r\n"


def connect_all(port: int, count: int, deadline: float) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError:
            break
        s.setblocking(False)
        socks.append(s)
    return socks


def exchange(socks: list[socket.socket], request: bytes, done, deadline: float) -> int:
    """Send `request` on every socket, then read until `done(received)` says
    the part we wait for has come: how many got it before the deadline."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytes] = {}
    for s in socks:
        try:
            s.send(request)
        except OSError:
            continue
        received[s] = b""
        selector.register(s, selectors.EVENT_READ)
    answered = 0
    while received and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(s)
                received.pop(s)
                continue
            received[s] += data
            if done(received[s]):
                answered += 1
                selector.unregister(s)
                received.pop(s)
    selector.close()
    return answered


def _small_done(data: bytes) -> bool:
    """A whole response with a Content-Length has come."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _first_chunk(data: bytes) -> bool:
    return b"data: first" in data


def per_connection_kib(port: int, master: int, count: int, held: bool, timeout: float = 60) -> tuple[float | None, str]:
    """(KiB per connection, note): RSS growth of the worker under `master`
    with `count` idle keep-alive clients (or held streams), over `count`."""
    raise_fd_limit()
    worker = worker_pid(master)
    request, done = (HOLD_REQUEST, _first_chunk) if held else (SMALL_REQUEST, _small_done)
    warm = connect_all(port, 50, time.monotonic() + timeout)  # pools, buffers, first-use allocations
    exchange(warm, request, done, time.monotonic() + timeout)
    for s in warm:
        s.close()
    time.sleep(1.5)
    before = rss_kib(worker)
    deadline = time.monotonic() + timeout
    socks = connect_all(port, count, deadline)
    answered = exchange(socks, request, done, deadline)
    time.sleep(2)
    after = rss_kib(worker)
    for s in socks:
        s.close()
    time.sleep(1)
    if answered < count:
        return None, f"{answered}/{count} answered"
    return (after - before) / count, ""


def many_clients(port: int, count: int, timeout: float = 90) -> str:
    """`count` keep-alive connections at once, then a request on each."""
    raise_fd_limit()
    started = time.monotonic()
    deadline = started + timeout
    socks = connect_all(port, count, deadline)
    connected = len(socks)
    answered = exchange(socks, SMALL_REQUEST, _small_done, deadline)
    elapsed = time.monotonic() - started
    for s in socks:
        s.close()
    say(f"  {count} keep-alive clients on one worker: {connected} connected, {answered} answered "
        f"in {elapsed:.1f} s")
    return f"{answered}/{count}"
