"""Idle keep-alive connections without a greenlet.

A keep-alive connection idle for PARK_AFTER seconds since its last response,
with nothing buffered, ends its greenlet and is watched by an io watcher on
its socket instead (a greenlet and its copy of the C stack are most of what
an idle connection costs: docs/performance.md). The first byte of its next
request starts a fresh greenlet that resumes the keep-alive loop
(keepalive.py); the rest of the `keepalive` timeout ends it quietly, as an
idle greenlet's would.

A parked connection keeps everything a waiting one holds against the limits:
its slot in the listener's pool (so `worker_connections` still bounds the
connections a worker holds, parked or not, as nginx's keep-alive
connections count against its worker_connections) and its count in
`max_connections_per_ip`. Stopping the listener (stop, reload,
max_requests) closes parked connections at once, answering the one whose
next request has just arrived.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Protocol

from gevent.pool import Group, Pool

from rproxy.server.sockets import readable_now

log = logging.getLogger("rproxy.worker")

# Seconds a keep-alive connection waits for its next request in its own
# greenlet before it parks. Parking at once costs a greenlet start per
# request (0.66x the throughput in the first measurement); after a second
# idle, the connections that park are the ones that cost memory for long.
PARK_AFTER = 1.0

# What a connection handler returns when it parked its connection: its pool
# slot passes to the parked connection instead of being freed.
PARKED = object()

_READ = 1  # libev's EV_READ


def _peer(addr: Any) -> str:
    return addr[0] if isinstance(addr, tuple) else "-"


class Parked:
    """One parked connection: its socket, what its next greenlet needs to
    go on, what it holds against the limits, its watcher and its timer."""

    __slots__ = ("sock", "listener", "addr", "req_count", "proxy_protocol_info", "pool", "release",
                 "until", "watcher", "timer")

    def __init__(self, sock: socket.socket, listener: Any, addr: Any, req_count: int,
                 proxy_protocol_info: Any, pool: ConnectionPool, release: Callable[[], None]) -> None:
        self.sock = sock
        self.listener = listener
        self.addr = addr
        self.req_count = req_count
        self.proxy_protocol_info = proxy_protocol_info
        self.pool = pool
        self.release = release  # what it holds beyond its pool slot (max_connections_per_ip)
        self.until = 0.0
        self.watcher: Any = None
        self.timer: Any = None

    def watch(self, loop: Any, seconds: float) -> None:
        """Wait, in the event loop, for the next request's first byte (or the
        client's close) for at most `seconds`."""
        self.until = loop.now() + seconds
        self.watcher = loop.io(self.sock.fileno(), _READ)
        self.watcher.start(self._wake)
        self.timer = loop.timer(seconds)
        self.timer.start(self._expire)
        self.pool.parked.add(self)
        log.debug("keep-alive connection from %s idle: parked", _peer(self.addr))

    def _unwatch(self) -> None:
        self.pool.parked.discard(self)
        self.watcher.close()
        self.timer.close()

    def _wake(self) -> None:
        """Bytes (or the client's close): a greenlet serves the connection
        again, in the slot it kept."""
        self._unwatch()
        self.pool.resume(self.pool.serve_parked, self)

    def _expire(self) -> None:
        log.debug("parked keep-alive connection from %s idle: closed", _peer(self.addr))
        self.close()

    def close(self) -> None:
        self._unwatch()
        self.sock.close()
        self.release()
        self.pool.unpark()

    def stop(self) -> None:
        """The listener stops: close now, unless the next request is already
        here (then it is served, with Connection: close, as the worker no
        longer keeps connections alive)."""
        if readable_now(self.sock):
            self._wake()
        else:
            self.close()


class Waiting(Protocol):
    """A parked connection, or a held stream (held.py)."""

    def stop(self) -> None: ...


class ConnectionPool(Pool):
    """gevent's pool of a listener's connection greenlets, in which a parked
    connection keeps the slot its greenlet had: the acceptor stops at
    `worker_connections` greenlets and parked connections together."""

    # The greenlet a parked connection resumes in: set by the worker.
    serve_parked: Callable[[Parked], Any]

    def __init__(self, size: int | None = None, greenlet_class: Any = None) -> None:
        super().__init__(size, greenlet_class)
        self.parked: set[Waiting] = set()
        self.parked_slots = 0

    def free_count(self) -> int:
        size: int | None = self.size
        if size is None:
            return 1
        return max(0, size - len(self) - self.parked_slots)

    def _discard(self, greenlet: Any) -> None:
        if greenlet.value is PARKED:
            # Its connection is parked: the slot is kept (not released to the semaphore).
            Group._discard(self, greenlet)
            self.parked_slots += 1
        else:
            super()._discard(greenlet)

    def resume(self, run: Callable[..., Any], *args: Any) -> None:
        """Start a greenlet, run(*args), for a parked connection (or held
        stream: held.py) in the slot it kept (without waiting on the
        semaphore, whose count already holds it)."""
        greenlet = self.greenlet_class(run, *args)
        self.parked_slots -= 1
        Group.add(self, greenlet)
        greenlet.start()

    def unpark(self) -> None:
        """A parked connection closed: its slot is free."""
        self.parked_slots -= 1
        self._semaphore.release()

    def stop_parked(self) -> None:
        for parked in list(self.parked):
            parked.stop()
