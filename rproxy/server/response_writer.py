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

import re
import time
from email.utils import formatdate
from typing import Any

from gunicorn import util
from gunicorn.http import message, wsgi
from gunicorn.http2 import response as http2_response
from gunicorn.workers import base_async

_date: list[Any] = [0, ""]  # the second, and its Date
# gunicorn's rules: names are tokens, values printable (or tab, space, obs-text).
_valid_names = re.compile(r"(?:%s\n)+" % message.TOKEN_RE.pattern).fullmatch
_valid_values = wsgi.HEADER_VALUE_RE.fullmatch
# What gunicorn's writer drops (hop-by-hop, and Server: its own goes out),
# Content-Length, which it reads, and Date, which it keeps.
_SPECIAL = frozenset(util.hop_headers) | {"content-length"}


# The Server header line (HTTP/1.x) and field (HTTP/2), or none: install().
_server_line = "Server: rproxy\r\n"
_server_fields: list[tuple[str, str]] = [("server", "rproxy")]


def install(server_header: str) -> None:
    """In a worker, before it serves: gunicorn writes responses with these
    classes, and `server_header` ("" for none) as their Server."""
    global _server_line, _server_fields
    _server_line = f"Server: {server_header}\r\n" if server_header else ""
    _server_fields = [("server", server_header)] if server_header else []
    wsgi.Response = Response
    # gunicorn's async worker names its HTTP/2 response class at module level.
    base_async.HTTP2Response = HTTP2Response


def http_date() -> str:
    second = int(time.time())
    if second != _date[0]:
        _date[:] = [second, formatdate(second, usegmt=True)]
    return _date[1]


class Response(wsgi.Response):

    def __init__(self, req, sock, cfg):
        super().__init__(req, sock, cfg)
        self._held_head: bytes | None = None
        self._holding = False
        self._has_date = False

    def process_headers(self, headers):
        names: str | None
        try:
            names = "\n".join([name for name, _ in headers]) + "\n"
            values = "\t".join([value for _, value in headers])
        except TypeError:
            names = values = None
        if names is None or not headers or not _valid_names(names) or not _valid_values(values):
            return super().process_headers(headers)  # raises naming the header at fault
        kept = self.headers
        for name, value in headers:
            lname = name.lower()
            if lname in _SPECIAL:
                value = value.strip(" \t")
                if lname == "content-length":
                    self.response_length = int(value)
                elif lname == "date":
                    if self._has_date:
                        continue  # one Date: the first
                    self._has_date = True
                else:
                    if lname == "connection":
                        if value.lower() == "upgrade":
                            self.upgrade = True
                    elif lname == "upgrade" and value.lower() == "websocket":
                        kept.append((name, value))
                    continue
                kept.append((name, value))
            else:
                kept.append((name, value.strip(" \t")))

    def default_headers(self):
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        version = self.req.version
        headers = [f"HTTP/{version[0]}.{version[1]} {self.status}\r\n", _server_line,
                   "" if self._has_date else f"Date: {http_date()}\r\n", f"Connection: {connection}\r\n"]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def send_headers(self):
        if self.headers_sent:
            return
        if not self._holding:
            return super().send_headers()
        lines = self.default_headers()
        lines.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        lines.append("\r\n")
        self._held_head = "".join(lines).encode("latin-1")
        self.headers_sent = True

    def write(self, arg):
        if self.headers_sent or not arg:
            return super().write(arg)
        self._holding = True
        try:
            super().write(arg)  # builds the head, then _emit_body sends both
        finally:
            self._holding = False
            head, self._held_head = self._held_head, None
            if head is not None:  # no body bytes went out (HEAD, 304, ...): the head alone
                self.sock.sendall(head)

    def _emit_body(self, data):
        head = self._held_head
        if head is None:
            return super()._emit_body(data)
        self._held_head = None
        if self.chunked:
            self.sock.sendall(b"%b%X\r\n%b\r\n" % (head, len(data), data))
        else:
            self.sock.sendall(head + data)


class HTTP2Response(http2_response.HTTP2Response):
    """gunicorn's HTTP/2 response, with rproxy's Server (or none), and the
    application's Date or else the proxy's."""

    _date: str | None = None

    def process_headers(self, headers):
        super().process_headers(headers)  # drops Server and Date as it does over HTTP/1
        self._date = next((value.strip(" \t") for name, value in headers if name.lower() == "date"), None)

    def send_headers(self):
        if self.headers_sent:
            return
        headers = [*self.headers, *_server_fields, ("date", self._date or http_date())]
        if not self.h2_conn.send_response_headers(self.stream_id, self.status_code, headers, end_stream=False):
            self._aborted("stream closed before headers were sent")
        self.headers_sent = True
