"""How rproxy's worker writes an HTTP/1.x response: gunicorn's writer, with
the head held back until the first piece of the body, so that both go out
in one send (one syscall and one greenlet round through the socket instead
of two: for a small response that was a tenth of the worker's CPU), and the
Date header rendered once a second instead of once a response, and added
only when the application set none: a response the cache stored keeps the
origin's Date when it is served again (RFC 9110 6.6.1, RFC 9111 4). And the
Server header of both HTTP/1.x and HTTP/2 responses: `[server]
server_header`, or none, chosen once per worker (install()).
"""

from __future__ import annotations

import io
import os
import socket
import time
from email.utils import formatdate
from typing import Any

from gevent.socket import wait_write
from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http2 import response as http2_response
from gunicorn.workers import base_async

from rproxy.server.sockets import send_all

_date: tuple[int, str] = (0, "")  # the second, and its Date


# The Server header line (HTTP/1.x) and field (HTTP/2), or none: install().
_server_line = "Server: rproxy\r\n"
_server_fields: list[tuple[str, str]] = [("server", "rproxy")]


def install(server_header: str) -> None:
    """In a worker, before it serves: gunicorn writes responses with these
    classes, and `server_header` ("" for none) as their Server."""
    global _server_line, _server_fields
    _server_line = f"Server: {server_header}\r\n" if server_header else ""
    _server_fields = [("server", server_header)] if server_header else []
    # gunicorn's wsgi.create takes a response_class, but its async worker's
    # handle_request calls it without one: passing ours would mean a copy of
    # that method. The module global is what it builds from (a canary pins it).
    wsgi.Response = Response
    # gunicorn's async worker names its HTTP/2 response class at module level.
    base_async.HTTP2Response = HTTP2Response


# Response fields gunicorn's process_headers kept as they were, remembered so
# that a response carrying the same field again (a stored response's, an
# upstream's usual ones, rproxy's own) skips its checks: they depend on the
# name and value alone. A field is remembered the second time it passes, so
# the ones that differ on every response (a request id, an Age) never fill
# the memo; and never remembered are fields it changed (trimmed), dropped
# (hop-by-hop ones, Server, Date) or reads (Content-Length, Upgrade), and long
# values. Both sets are bounded: upstreams choose the fields.
_kept: set[tuple[str, str]] = set()
_seen: set[tuple[str, str]] = set()
_MEMO_SIZE = 2048
_MEMO_VALUE = 256
_READ = frozenset({"content-length", "upgrade"})


def _process_headers(check: Any, out: list[tuple[str, str]], headers: Any) -> str | None:
    """gunicorn's process_headers (`check`, appending to `out`) over
    `headers`, one field at a time past the fields it already kept; returns
    the application's Date (the first, if it set several), which gunicorn
    drops with the hop-by-hop fields: the writer puts it back."""
    kept, date = _kept, None
    for field in headers:
        try:
            if field in kept:
                out.append(field)
                continue
        except TypeError:  # unhashable: gunicorn's check says what is wrong with it
            pass
        n = len(out)
        check((field,))
        name = field[0]
        if len(out) > n:
            if out[n] == field and len(field[1]) <= _MEMO_VALUE and name.lower() not in _READ:
                _remember(field)
        elif date is None and len(name) == 4 and name.lower() == "date":
            date = field[1].strip(" \t")
    return date


def _remember(field: tuple[str, str]) -> None:
    if field not in _seen:
        if len(_seen) >= _MEMO_SIZE:
            _seen.clear()
        _seen.add(field)
        return
    if len(_kept) >= _MEMO_SIZE:
        _kept.clear()
    _kept.add(field)


def http_date() -> str:
    global _date
    second = int(time.time())
    if second != _date[0]:
        _date = (second, formatdate(second, usegmt=True))
    return _date[1]


class Response(wsgi.Response):
    headers_sent: bool  # gunicorn's

    def __init__(self, req: Any, sock: Any, cfg: Any) -> None:
        super().__init__(req, sock, cfg)
        self._held_head: bytes | None = None
        self._holding = False
        self._date: str | None = None  # the application's, kept (a cached response's stored Date)

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        # gunicorn's validates each field and drops hop-by-hop ones, Server and Date
        self._date = _process_headers(super().process_headers, self.headers, headers)

    def default_headers(self) -> list[str]:
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        version = self.req.version
        headers = [f"HTTP/{version[0]}.{version[1]} {self.status}\r\n", _server_line,
                   f"Date: {self._date or http_date()}\r\n", f"Connection: {connection}\r\n"]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        if not self._holding:
            super().send_headers()
            return
        lines = self.default_headers()
        lines.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        lines.append("\r\n")
        self._held_head = "".join(lines).encode("latin-1")
        self.headers_sent = True

    def write(self, arg: bytes) -> None:
        if self.headers_sent or not arg:
            super().write(arg)
            return
        self._holding = True
        try:
            super().write(arg)  # builds the head, then _emit_body sends both
        finally:
            self._holding = False
            head, self._held_head = self._held_head, None
            if head is not None:  # no body bytes went out (HEAD, 304, ...): the head alone
                send_all(self.sock, head)

    def _emit_body(self, data: bytes) -> None:
        head = self._held_head
        if head is None:
            super()._emit_body(data)
            return
        self._held_head = None
        if self.chunked:
            send_all(self.sock, b"%b%X\r\n%b\r\n" % (head, len(data), data))
        else:
            send_all(self.sock, head + data)


    def sendfile(self, respiter: Any) -> bool:
        """A file-wrapped body (PEP 3333 wsgi.file_wrapper) with os.sendfile,
        on plain sockets, as gunicorn does: Content-Length bytes (else up to
        the end of the file) from the file's current position, which is left
        where it was. gunicorn calls gevent's socket.sendfile, which never
        uses os.sendfile (it reads 8 KiB blocks and sends each): here
        os.sendfile runs on the non-blocking socket and the greenlet waits
        whenever the socket's buffer is full."""
        if self.cfg.is_ssl or not self.can_sendfile() or not util.has_fileno(respiter.filelike):
            return False
        fileno = respiter.filelike.fileno()
        try:
            offset = os.lseek(fileno, 0, os.SEEK_CUR)
            nbytes = os.fstat(fileno).st_size - offset if self.response_length is None else self.response_length
        except (OSError, io.UnsupportedOperation):
            return False
        self.send_headers()
        if self._omits_body:
            return True
        chunked = self.is_chunked()
        if chunked:
            self.sock.sendall(b"%X\r\n" % nbytes)
        sock, timeout = self.sock.fileno(), self.sock.gettimeout()
        pos, end = offset, offset + nbytes
        while pos < end:
            try:
                sent = os.sendfile(sock, fileno, pos, end - pos)
            except BlockingIOError:
                wait_write(sock, timeout, timeout_exc=_timed_out)
                continue
            if not sent:  # the file is shorter than its Content-Length
                raise OSError(f"file ends {end - pos} bytes before the response's length")
            pos += sent
            self.sent += sent
        if chunked:
            self.sock.sendall(b"\r\n")
        return True


_timed_out = socket.timeout("timed out sending a file")


class HTTP2Response(http2_response.HTTP2Response):
    """gunicorn's HTTP/2 response, with rproxy's Server (or none) and the
    application's Date or else the proxy's, in as few frames as it can: the
    DATA frame that completes a Content-Length ends the stream itself, where
    gunicorn sends an empty DATA frame after it to end it. (The connection's
    writer sends the frames of one loop turn together, so a small response
    is one send, one TLS record.) Trailers need a body without
    Content-Length, as over HTTP/1.1 (where they need chunked coding)."""

    headers_sent: bool  # gunicorn's
    _stream_ended: bool  # gunicorn's
    _date: str | None = None

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        # gunicorn's drops Server and Date as it does over HTTP/1
        self._date = _process_headers(super().process_headers, self.headers, headers)

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        headers = [*self.headers, *_server_fields, ("date", self._date or http_date())]
        if not self.h2_conn.send_response_headers(self.stream_id, self.status_code, headers):
            self._aborted("stream closed before headers were sent")
        self.headers_sent = True

    def _emit_body(self, data: bytes) -> None:
        if not data or self._stream_ended:
            return
        last = (self.response_length is not None and self.sent >= self.response_length
                and not getattr(self, "trailers", None))
        if not self.h2_conn.send_data(self.stream_id, data, end_stream=last):
            self._aborted("stream closed or stalled while sending the body")
        if last:
            self._stream_ended = True
