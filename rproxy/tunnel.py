"""Upgrade and WebSocket passthrough: after a 101, splice raw bytes.

The upgrade request goes to a new upstream connection (a tunnel holds its
connection for its whole life, so it never comes from the pool). An upstream
that answers without 101 is relayed as an ordinary response. On 101 the
response head is written straight onto the client socket, the bytes either
side already read past its head are passed on, and then two greenlets copy
one direction each: the request's own greenlet client -> upstream, one more
upstream -> client.

EOF on one side half-closes the other (shutdown SHUT_WR); when both are done,
both sockets are closed. A tunnel idle for the route's `idle_timeout` is
closed. When the worker shuts down gracefully, WebSocket peers get a close
frame 1001 (going away) first, as long as no frame is half-way across.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import time

import gevent
import gevent.socket
from gevent.event import Event

from . import accesslog
from .http import HOP_BY_HOP, Request, Response, connection_tokens, error_response
from .upstream import Server

log = logging.getLogger("rproxy.tunnel")

MAX_HEAD = 64 * 1024
CHUNK = 64 * 1024
GOING_AWAY_GRACE = 2.0

try:
    from gunicorn.workers.base_async import ALREADY_HANDLED
except ImportError:  # served by something else than gunicorn: no tunnels
    ALREADY_HANDLED = object()


class FrameTracker:
    """Follows WebSocket frame boundaries in one direction of a tunnel, so a
    close frame is only ever inserted between frames."""

    __slots__ = ("remaining", "pending")

    def __init__(self):
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
    __slots__ = ("client", "upstream", "websocket", "trackers", "sent", "last_active",
                 "closing", "idle_timeout", "finished", "__weakref__")

    def __init__(self, client, upstream, websocket: bool, idle_timeout: float):
        self.client = client
        self.upstream = upstream
        self.websocket = websocket
        # [0]: client -> upstream, [1]: upstream -> client
        self.trackers = (FrameTracker(), FrameTracker()) if websocket else None
        self.sent = [0, 0]
        self.last_active = time.monotonic()
        self.closing = False
        self.idle_timeout = idle_timeout
        self.finished = Event()  # set when upstream -> client is done

    def pump(self, direction: int, src, dst, data: bytes) -> None:
        """Copy src to dst, starting with `data`, until EOF, an error or the end."""
        tracker = self.trackers[direction] if self.trackers else None
        sent = self.sent
        try:
            while True:
                if data and not self.closing:  # going away: drain, do not forward
                    if tracker is not None:
                        tracker.feed(data)
                    dst.sendall(data)
                    sent[direction] += len(data)
                    self.last_active = time.monotonic()
                data = src.recv(CHUNK)
                if not data:
                    break
        except OSError:
            self.end()  # a reset on one side ends both directions
        finally:
            _shutdown(dst, socket.SHUT_WR)

    def pump_back(self, data: bytes) -> None:
        try:
            self.pump(1, self.upstream, self.client, data)
        finally:
            self.finished.set()

    def end(self) -> None:
        _shutdown(self.client, socket.SHUT_RDWR)
        _shutdown(self.upstream, socket.SHUT_RDWR)

    def going_away(self) -> None:
        """Worker shutdown: a 1001 close frame to each WebSocket peer that is
        between frames, then end the tunnel."""
        self.closing = True
        if self.websocket:
            if self.trackers[1].at_boundary:
                _send(self.client, close_frame(1001, masked=False))
            if self.trackers[0].at_boundary:
                _send(self.upstream, close_frame(1001, masked=True))
        _shutdown(self.client, socket.SHUT_WR)
        _shutdown(self.upstream, socket.SHUT_WR)
        # Give the peers a moment to answer with their close, then cut.
        gevent.spawn_later(GOING_AWAY_GRACE, self.end)


def _shutdown(sock, how) -> None:
    # On a TLS socket, SSLSocket.shutdown() also drops the TLS layer, which
    # would break the direction still running: shut the TCP socket underneath.
    try:
        if isinstance(sock, gevent.socket.socket):
            gevent.socket.socket.shutdown(sock, how)
        else:
            sock.shutdown(how)
    except OSError:
        pass


def _send(sock, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


class Tunnels:
    """The open tunnels of this worker: the cap, the idle sweep (one timer
    for all, rather than a timeout on every socket) and going-away."""

    SWEEP_EVERY = 1.0

    def __init__(self, limit: int):
        self.limit = limit
        self.open: set[Tunnel] = set()
        self.shutting_down = False
        self._sweeper = None

    def full(self) -> bool:
        return len(self.open) >= self.limit or self.shutting_down

    def add(self, tunnel: Tunnel) -> None:
        self.open.add(tunnel)
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def _sweep(self) -> None:
        while True:
            gevent.sleep(self.SWEEP_EVERY)
            now = time.monotonic()
            for tunnel in list(self.open):
                if not tunnel.closing and now - tunnel.last_active >= tunnel.idle_timeout:
                    log.info("tunnel idle for %gs, closing it", tunnel.idle_timeout)
                    tunnel.closing = True
                    tunnel.end()

    def going_away(self) -> None:
        self.shutting_down = True
        for tunnel in list(self.open):
            tunnel.going_away()


class _Replay(io.RawIOBase):
    """A socket's stream with bytes already read put back in front, so that
    http.client can parse a non-101 answer whose head we read ourselves."""

    def __init__(self, data: bytes, sock):
        self.data = data
        self.sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.data:
            n = min(len(buffer), len(self.data))
            buffer[:n] = self.data[:n]
            self.data = self.data[n:]
            return n
        return self.sock.recv_into(buffer)

    def makefile(self, mode="rb", buffering=-1):
        return io.BufferedReader(self)


def request_head(request: Request, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"{request.method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Connection: Upgrade", f"Upgrade: {request.upgrade}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def read_head(sock) -> tuple[bytes, int]:
    """Read until the end of a response head; returns (buffer, head length)."""
    buf = bytearray()
    while True:
        data = sock.recv(CHUNK)
        if not data:
            raise http.client.RemoteDisconnected("upstream closed the connection without a response")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buf), end + 4
        if len(buf) > MAX_HEAD:
            raise http.client.LineTooLong("response head")


def switching_head(head: bytes) -> bytes:
    """The 101 head for the client: the upstream's, less other hop-by-hop headers."""
    lines = head.split(b"\r\n")
    fields = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        fields.append((name.strip().decode("latin-1"), value.strip().decode("latin-1")))
    named = connection_tokens(", ".join(v for k, v in fields if k.lower() == "connection"))
    kept = [(k, v) for k, v in fields
            if k.lower() == "upgrade" or (k.lower() not in HOP_BY_HOP and k.lower() not in named)]
    out = [lines[0].decode("latin-1"), "Connection: Upgrade"]
    out += [f"{k}: {v}" for k, v in kept]
    return ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def buffered_client_bytes(environ) -> bytes:
    """Bytes the client sent right behind its request head, already read
    into gunicorn's buffer behind wsgi.input."""
    body = environ.get("wsgi.input")
    unreader = getattr(getattr(body, "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    data = take() if take else b""
    pending = getattr(body, "buf", None)
    if pending is not None and pending.tell():
        data = pending.getvalue() + data
    return data


def open_tunnel(request: Request, server: Server, forwarder, target: str,
                headers: dict[str, str]) -> Response:
    """Handle an upgrade request end to end, for `forwarder`'s route: its
    timeouts and tunnels, and its ways of answering errors (`failure`) and
    relaying ordinary responses (`proxied`)."""
    environ = request.environ
    client = environ.get("gunicorn.socket")
    if client is None or environ.get("SERVER_PROTOCOL", "").startswith("HTTP/2"):
        return error_response(request, 400, "protocol upgrades need HTTP/1.1")
    if request.has_body:
        return error_response(request, 400, "an upgrade request cannot carry a body")
    tunnels: Tunnels = forwarder.tunnels
    if tunnels.full():
        return error_response(request, 503, "too many open tunnels in this worker", [("Retry-After", "1")])

    conn = server.pool._new_conn()
    conn.timeout = forwarder.connect_timeout
    started = time.monotonic()
    try:
        conn.connect()
        upstream = conn.sock
        upstream.settimeout(forwarder.read_timeout)
        upstream.sendall(request_head(request, target, headers))
        buf, head_len = read_head(upstream)
    except Exception as e:
        conn.close()
        return forwarder.failure(request, server, e)
    environ["rproxy.upstream_ms"] = f"{(time.monotonic() - started) * 1000:.1f}"

    if buf[9:12] != b"101":
        # Not switching: an ordinary response, on a connection nobody reuses.
        response = http.client.HTTPResponse(_Replay(buf, upstream), method=request.method)
        try:
            response.begin()
        except Exception as e:
            upstream.close()
            return forwarder.failure(request, server, e)
        return forwarder.proxied(request, server.label, response, lambda reusable: upstream.close())

    client.sendall(switching_head(buf[:head_len]))
    tunnel = Tunnel(client, upstream, request.upgrade.lower() == "websocket", forwarder.idle_timeout)
    upstream.settimeout(None)  # idleness is the sweeper's business
    client.settimeout(None)
    tunnels.add(tunnel)
    gevent.spawn_raw(tunnel.pump_back, buf[head_len:])
    del buf, conn, headers  # nothing of the handshake is needed any more
    try:
        tunnel.pump(0, client, upstream, buffered_client_bytes(environ))
        tunnel.finished.wait()
    finally:
        tunnels.open.discard(tunnel)
        upstream.close()
        # gunicorn closes the client socket; make its next read see the end.
        _shutdown(client, socket.SHUT_RDWR)
        accesslog.tunnel_line(environ, time.monotonic() - started, tunnel.sent[0], tunnel.sent[1])
    return Response(101, [], ALREADY_HANDLED)
