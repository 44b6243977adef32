"""Upgrade and WebSocket passthrough: after a 101, splice raw bytes.

The upgrade request goes to a new upstream connection (a tunnel holds its
connection for its whole life, so it never comes from the pool). An upstream
that answers without 101 is relayed as an ordinary response. On 101 the
response head is written straight onto the client socket, the bytes either
side already read past its head are passed on, and the connection leaves
gunicorn's hands: its request greenlet ends, and the tunnel lives on in the
event loop.

Each direction is copied by a greenlet of its own, which exists only while
that direction has bytes to move: when a socket becomes readable, the loop
starts a greenlet that copies until the socket has nothing more, then it
ends and the socket is watched again. An idle tunnel is two sockets and two
watchers, a few KiB, so tens of thousands of idle WebSockets fit in a worker.

EOF on one side half-closes the other (shutdown SHUT_WR); when both are done,
both sockets are closed. A tunnel idle for the route's `idle_timeout` is
closed. When the worker stops, WebSocket peers get a close frame 1001 (going
away) first, as long as no frame is half-way across.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket
from urllib3.connection import HTTPConnection

from rproxy.forwarding.exchange import UpstreamResponse, read_head, request_head
from rproxy.messages import Request, Response, clean_response_headers, error_response
from rproxy.observability import metrics
from rproxy.server import accesslog
from rproxy.server.sockets import shutdown_tcp
from rproxy.server.takeover import TAKEN_OVER, buffered_client_bytes, client_socket
from rproxy.upstreams.servers import Server

if TYPE_CHECKING:
    from rproxy.forwarding.forwarder import Forwarder

log = logging.getLogger("rproxy.tunnel")

CHUNK = 256 * 1024
GOING_AWAY_GRACE = 2.0

class FrameTracker:
    """Follows WebSocket frame boundaries in one direction of a tunnel, so a
    close frame is only ever inserted between frames."""

    __slots__ = ("remaining", "pending")

    def __init__(self) -> None:
        self.remaining = 0          # payload bytes left in the current frame
        self.pending = b""          # a frame header split across reads

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self.pending

    def feed(self, data: bytes) -> None:
        if self.remaining >= len(data) and not self.pending:
            self.remaining -= len(data)
            return
        view = memoryview(self.pending + data if self.pending else data)
        self.pending = b""
        pos = 0
        while True:
            if self.remaining:
                step = min(self.remaining, len(view) - pos)
                self.remaining -= step
                pos += step
            if pos >= len(view):
                return
            header = view[pos:pos + 14]
            if len(header) < 2:
                self.pending = bytes(view[pos:])
                return
            size, masked = header[1] & 0x7F, header[1] & 0x80
            need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if masked else 0)
            if len(header) < need:
                self.pending = bytes(view[pos:])
                return
            if size == 126:
                size = int.from_bytes(header[2:4], "big")
            elif size == 127:
                size = int.from_bytes(header[2:10], "big")
            pos += need
            self.remaining = size


def close_frame(code: int, masked: bool) -> bytes:
    payload = code.to_bytes(2, "big")
    if not masked:
        return b"\x88" + bytes([len(payload)]) + payload
    key = os.urandom(4)
    return b"\x88" + bytes([0x80 | len(payload)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Tunnel:
    """Both directions of one tunnel: [0] client -> upstream, [1] upstream -> client."""

    __slots__ = ("socks", "keeper", "watchers", "websocket", "trackers", "sent", "eof",
                 "last_active", "closing", "ended", "idle_timeout", "registry", "server", "facts",
                 "started", "__weakref__")

    def __init__(self, client: socket.socket, upstream: socket.socket, websocket: bool, idle_timeout: float,
                 registry: Tunnels, server: Server, facts: dict[str, Any]) -> None:
        for sock in (client, upstream):
            sock.settimeout(0.0)  # pumps wait for readiness themselves
        self.socks = (client, upstream)
        # gunicorn closes its socket when its request greenlet ends; an open
        # file object on it keeps the connection until the tunnel is done.
        self.keeper = client.makefile("rb", buffering=0)
        loop = gevent.get_hub().loop
        self.watchers = (loop.io(client.fileno(), 1), loop.io(upstream.fileno(), 1))
        self.websocket = websocket
        self.trackers = (FrameTracker(), FrameTracker()) if websocket else None
        self.sent = [0, 0]
        self.eof = [False, False]
        self.last_active = self.started = time.monotonic()
        self.closing = False
        self.ended = False
        self.idle_timeout = idle_timeout
        self.registry = registry
        self.server = server      # counts the tunnel as in flight (least_conn)
        self.facts = facts  # what the access-log line needs of the request

    def start(self, client_bytes: bytes, upstream_bytes: bytes) -> None:
        self.registry.add(self)
        self.server.begin()
        for direction, pending in ((0, client_bytes), (1, upstream_bytes)):
            if pending:
                gevent.spawn_raw(self._pump, direction, pending)
            else:
                self._watch(direction)

    def _watch(self, direction: int) -> None:
        if not self.ended:
            self.watchers[direction].start(self._readable, direction)

    def _readable(self, direction: int) -> None:
        # In the event loop: hand the copying to a short-lived greenlet.
        self.watchers[direction].stop()
        gevent.spawn_raw(self._pump, direction, b"")

    def _pump(self, direction: int, data: bytes) -> None:
        """Copy what src has (starting with `data`) to dst, then watch src again."""
        src, dst = self.socks[direction], self.socks[1 - direction]
        try:
            while True:
                if data and not self.closing:  # going away: drain, do not forward
                    if self.trackers is not None:
                        self.trackers[direction].feed(data)
                    _send_all(dst, data, self.idle_timeout)
                    self.sent[direction] += len(data)
                    self.last_active = time.monotonic()
                try:
                    data = src.recv(CHUNK)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    self._watch(direction)
                    return
                if not data:
                    self._eof(direction)
                    return
        except OSError:
            self.end()  # a reset, or a peer that stopped reading: both directions end

    def _eof(self, direction: int) -> None:
        self.eof[direction] = True
        if all(self.eof):
            self.end()
        else:
            shutdown_tcp(self.socks[1 - direction], socket.SHUT_WR)

    def end(self) -> None:
        """Close both sides, once; write the access-log line."""
        if self.ended:
            return
        self.ended = True
        for watcher in self.watchers:
            watcher.stop()
        client, upstream = self.socks
        shutdown_tcp(client, socket.SHUT_RDWR)
        upstream.close()
        self.keeper.close()  # the client socket really closes once gunicorn let go too
        self.registry.discard(self)
        self.server.end()
        accesslog.tunnel_line(self.facts, time.monotonic() - self.started, self.sent[0], self.sent[1])

    def going_away(self) -> None:
        """Worker shutdown: a 1001 close frame to each WebSocket peer that is
        between frames, then end the tunnel."""
        self.closing = True
        client, upstream = self.socks
        if self.trackers is not None:  # a WebSocket
            if self.trackers[1].at_boundary:
                _send_quietly(client, close_frame(1001, masked=False))
            if self.trackers[0].at_boundary:
                _send_quietly(upstream, close_frame(1001, masked=True))
        shutdown_tcp(client, socket.SHUT_WR)
        shutdown_tcp(upstream, socket.SHUT_WR)


def _send_all(sock: socket.socket, data: bytes, timeout: float) -> None:
    """sendall for a non-blocking (possibly TLS) socket; a peer that reads
    nothing for `timeout` raises socket.timeout."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError):
            gevent.socket.wait_write(sock.fileno(), timeout)
        except ssl.SSLWantReadError:
            gevent.socket.wait_read(sock.fileno(), timeout)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        _send_all(sock, data, 1.0)
    except OSError:
        pass


class Tunnels:
    """The open tunnels of this worker: the cap, the idle sweep (one timer
    for all of them) and going-away when the worker stops."""

    SWEEP_EVERY = 1.0

    def __init__(self, limit: int):
        self.limit = limit
        self.open: set[Tunnel] = set()
        self.shutting_down = False
        self._sweeper = None
        counters = metrics.get()
        self.gauge = counters.tunnels if counters is not None else None

    def full(self) -> bool:
        return len(self.open) >= self.limit or self.shutting_down

    def add(self, tunnel: Tunnel) -> None:
        self.open.add(tunnel)
        if self.gauge is not None:
            self.gauge.inc()
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def discard(self, tunnel: Tunnel) -> None:
        if tunnel in self.open:
            self.open.discard(tunnel)
            if self.gauge is not None:
                self.gauge.dec()

    def _sweep(self) -> None:
        while True:
            gevent.sleep(self.SWEEP_EVERY)
            now = time.monotonic()
            for tunnel in list(self.open):
                if not tunnel.closing and now - tunnel.last_active >= tunnel.idle_timeout:
                    log.info("tunnel idle for %gs, closing it", tunnel.idle_timeout)
                    tunnel.end()

    def going_away(self, grace: float = GOING_AWAY_GRACE) -> None:
        """Say goodbye to every tunnel; give the peers `grace` seconds to
        close their side, then cut what is left."""
        self.shutting_down = True
        if not self.open:
            return
        log.info("worker stopping: closing %d tunnels (going away)", len(self.open))
        for tunnel in list(self.open):
            tunnel.going_away()
        deadline = time.monotonic() + grace
        while self.open and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for tunnel in list(self.open):
            tunnel.end()


_UPGRADE = frozenset({"upgrade"})
_STATUS_101 = re.compile(rb"HTTP/1\.[01] 101(?: [\t !-~\x80-\xff]*)?")


def switching_head(head: bytes) -> bytes:
    """The 101 head for the client: the upstream's, less other hop-by-hop
    headers and anything malformed."""
    lines = head.split(b"\r\n")
    status = lines[0] if _STATUS_101.fullmatch(lines[0]) else b"HTTP/1.1 101 Switching Protocols"
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
    connection = ", ".join(v for k, v in fields if k.lower() == "connection")
    kept = clean_response_headers(fields, connection, chunked=False, keep=_UPGRADE)
    out = [status.decode("latin-1"), "Connection: Upgrade", *(f"{k}: {v}" for k, v in kept)]
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def open_tunnel(request: Request, server: Server, forwarder: Forwarder, target: str,
                headers: dict[str, str]) -> Response:
    """Handle an upgrade request end to end, for `forwarder`'s route: its
    timeouts and tunnels, and its ways of answering errors (`failure`) and
    relaying ordinary responses (`proxied`)."""
    environ = request.environ
    upgrade = request.upgrade
    assert upgrade is not None  # only upgrade requests come here
    client = client_socket(environ)
    if client is None:
        return error_response(request, 400, "protocol upgrades need HTTP/1.1")
    if request.has_body:
        return error_response(request, 400, "an upgrade request cannot carry a body")
    tunnels: Tunnels = forwarder.tunnels
    if tunnels.full():
        return error_response(request, 503, "too many open tunnels in this worker", [("Retry-After", "1")])

    conn = server.pool._new_conn()
    assert isinstance(conn, HTTPConnection)  # the pool classes' ConnectionCls (or its HTTPS subclass)
    conn.timeout = forwarder.connect_timeout
    started = time.monotonic()
    try:
        conn.connect()
        upstream = conn.sock
        upstream.settimeout(forwarder.read_timeout)
        spelled = request.header_case or {}
        upstream.sendall(request_head(request.method, target, headers,
                                      extra=f"{spelled.get('Connection', 'Connection')}: Upgrade\r\n"
                                            f"{spelled.get('Upgrade', 'Upgrade')}: {upgrade}\r\n",
                                      spelled=spelled))
        head, rest = read_head(upstream)
    except Exception as e:
        conn.close()
        return forwarder.failure(request, server, e)
    request.record.upstream_ms = (time.monotonic() - started) * 1000
    forwarder.upstream.succeeded(server)

    if head[9:12] != b"101":
        # Not switching: an ordinary response, on a connection nobody reuses.
        try:
            response = UpstreamResponse(upstream, request.method, buffered=head + b"\r\n\r\n" + rest)
        except Exception as e:
            upstream.close()
            return forwarder.failure(request, server, e)
        return forwarder.proxied(request, server.label, response, lambda reusable: upstream.close())

    client.sendall(switching_head(head))
    facts = {key: environ.get(key) for key in accesslog.FACTS}
    tunnel = Tunnel(client, upstream, upgrade.lower() == "websocket", forwarder.idle_timeout,
                    tunnels, server, facts)
    tunnel.start(buffered_client_bytes(environ), rest)
    return Response(101, [], TAKEN_OVER)
