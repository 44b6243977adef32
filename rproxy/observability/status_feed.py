"""The status page's live feed: `/status/live` on the admin listener, a
WebSocket over which the worker pushes what /status.json says, once a
second. The page falls back to polling /status.json when the socket drops.

The handshake is answered here; the connection is then taken over from
gunicorn as a tunnel's is (server/takeover.py) and served by a greenlet of
its own, with gevent-websocket's framing. One status is made per interval
and worker, however many pages watch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import time
from types import SimpleNamespace
from typing import Callable
from urllib.parse import urlsplit

import gevent
from gevent.socket import wait_read
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from rproxy.forwarding.tunnel import close_frame
from rproxy.messages import Response, error_response
from rproxy.server.takeover import TAKEN_OVER, buffered_client_bytes, client_socket

log = logging.getLogger("rproxy.admin")

INTERVAL = 1.0          # seconds between two pushes
MAX_FEEDS = 32          # open feeds per worker; 503 beyond
WRITE_TIMEOUT = 10.0    # a page that takes nothing for this long is dropped
MAX_FRAME = 4096        # the page sends nothing but close (and maybe ping) frames
GOING_AWAY_GRACE = 2.0


class _Stream:
    """What gevent-websocket reads frames from and writes them to: the
    client socket, after the bytes that came with the handshake."""

    __slots__ = ("sock", "pending")

    def __init__(self, sock, pending: bytes):
        self.sock = sock
        self.pending = pending

    def read(self, size: int) -> bytes:
        if size > MAX_FRAME:  # gevent-websocket would read a frame of any announced size
            raise WebSocketError(f"a frame of {size} bytes on the status feed")
        data, self.pending = self.pending[:size], self.pending[size:]
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


# What gevent-websocket's WebSocket asks of the pywsgi handler it normally
# runs under: a logger, and a server whose application has no `current_app`
# (its close callbacks are then no-ops).
_HANDLER = SimpleNamespace(logger=log, server=SimpleNamespace(application=None))


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    digest = hashlib.sha1((key + WebSocketHandler.GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_problem(environ) -> tuple[int, str, list] | None:
    """Why this request cannot open the feed: (status, message, headers), or None."""
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket" or "upgrade" not in [
            token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")]:
        return 426, "the live status feed is a WebSocket", [("Upgrade", "websocket")]
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1" or client_socket(environ) is None:
        return 400, "WebSockets need HTTP/1.1", []
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return 426, "only WebSocket version 13 is spoken", [("Sec-WebSocket-Version", "13")]
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except ValueError:
        key = b""
    if len(key) != 16:
        return 400, "Sec-WebSocket-Key is not 16 bytes in base64", []
    # Browsers let any page open a WebSocket anywhere and say where it came
    # from: only the status page's own origin may read the feed (tools
    # without an Origin may).
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and urlsplit(origin).netloc.lower() != environ.get("HTTP_HOST", "").lower():
        return 403, "the live status feed is for pages of this listener only", []
    return None


class StatusFeed:
    def __init__(self, status: Callable[[], dict], interval: float = INTERVAL, limit: int = MAX_FEEDS):
        self.status = status
        self.interval = interval
        self.limit = limit
        self.feeds: set[WebSocket] = set()
        self.stopping = False
        self._text = ""
        self._made = float("-inf")

    def message(self) -> str:
        """The status as JSON, made at most once per half interval."""
        now = time.monotonic()
        if now - self._made >= self.interval / 2:
            self._text, self._made = json.dumps(self.status()), now
        return self._text

    def open(self, environ) -> Response:
        """Answer the handshake and take the connection over, or refuse."""
        problem = handshake_problem(environ)
        if problem is not None:
            status, message, headers = problem
            return error_response(None, status, message, headers, environ=environ)
        if len(self.feeds) >= self.limit or self.stopping:
            return error_response(None, 503, "too many live status feeds in this worker",
                                  [("Retry-After", "5")], environ=environ)
        sock = client_socket(environ)
        assert sock is not None  # handshake_problem refused a request without one
        accept = accept_key(environ["HTTP_SEC_WEBSOCKET_KEY"].strip())
        sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode("ascii"))
        # gunicorn closes its socket when the request greenlet ends; an open
        # file object on it keeps the connection for the feed.
        keeper = sock.makefile("rb", buffering=0)
        ws = WebSocket({}, _Stream(sock, buffered_client_bytes(environ)), _HANDLER)
        self.feeds.add(ws)
        gevent.spawn(self._serve, ws, sock, keeper)
        return Response(101, [], TAKEN_OVER)

    def _serve(self, ws: WebSocket, sock, keeper) -> None:
        stream = ws.stream
        try:
            sock.settimeout(WRITE_TIMEOUT)
            while not self.stopping:
                ws.send(self.message())
                if not self._client_spoke(sock, stream):
                    continue
                header, payload = ws.read_frame()
                if header.opcode == WebSocket.OPCODE_CLOSE:
                    ws.handle_close(header, payload)  # answers with a close frame
                    return
                if header.opcode == WebSocket.OPCODE_PING:
                    ws.handle_ping(header, payload)
            # The worker stops: going away (gevent-websocket's close() sends no code).
            sock.sendall(close_frame(1001, masked=False))
        except (WebSocketError, OSError, UnicodeError):
            pass  # the page went away, or spoke nonsense: it reconnects or polls
        finally:
            self.feeds.discard(ws)
            ws.closed = True  # no close frame from the garbage collector, on a dead socket
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            keeper.close()

    def _client_spoke(self, sock, stream: _Stream) -> bool:
        """Wait up to an interval for the client to send something."""
        if stream.pending:
            return True
        try:
            wait_read(sock.fileno(), timeout=self.interval)
        except TimeoutError:
            return False
        return True

    def going_away(self, grace: float = GOING_AWAY_GRACE) -> None:
        """Worker shutdown: each feed says 1001 (going away) at its next
        turn; wait `grace` at most."""
        self.stopping = True
        deadline = time.monotonic() + grace
        while self.feeds and time.monotonic() < deadline:
            gevent.sleep(0.05)
