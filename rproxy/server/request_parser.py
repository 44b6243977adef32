"""gunicorn's HTTP/1.x request parser, as rproxy's worker reads requests.

- each chunk size of a request body is judged as soon as its line is in,
  before any of it goes upstream: 413 past `max_body_size`, 400 if absurd
  (ChunkedReader);
- a head with more fields than gunicorn_h1c holds gets the same 431 as any
  head over `max_headers`, and with `preserve_header_case` the names'
  spellings go along (Request);
- a keep-alive connection waits for its next request holding no finished
  request, at the top of its stack (RequestParser, called by keepalive.py's
  loop): about 2 KiB less per idle connection; where it stays idle, the
  worker parks it (parking.py).

The worker installs these in gunicorn's module globals (Worker.run).
"""

from __future__ import annotations

import os
import socket
import ssl
from typing import Any

import gevent
from gunicorn.http import body, message, parser
from gunicorn.http.body import LengthReader
from gunicorn.http.errors import InvalidChunkSize, InvalidRequestLine, LimitRequestHeaders

from rproxy.messages import BadRequest
from rproxy.server import header_case


def _nothing_left(body: Any) -> bool:
    """Was the whole body read (or there was none)? Then gunicorn's drain,
    with its socket timeout juggling, has nothing to do."""
    reader: Any = getattr(body, "reader", None)
    return type(reader) is LengthReader and reader.length == 0 and not body.failed


# RFC 9112 7.1: a chunk size is a length; one past what a file offset can
# hold is no body anyone sends (nginx refuses the same with 400).
MAX_CHUNK_SIZE = (1 << 63) - 1


class ChunkedReader(body.ChunkedReader):
    """gunicorn's reader of a chunked request body, judging each chunk size
    as soon as its line is read, before any of the chunk's data is read or
    forwarded: beyond MAX_CHUNK_SIZE it is malformed (400); taking the
    declared sizes so far past max_body_size it is too large (413, as
    nginx's "client intended to send too large chunked body"). Without this
    the start of such a body would already have gone upstream when the
    running count of bytes caught it."""

    max_body_size = 0  # [server] max_body_size, set once per worker; 0 = unlimited

    def __init__(self, req: Any, unreader: Any) -> None:
        super().__init__(req, unreader)
        self.declared = 0

    def parse_chunk_size(self, unreader: Any, data: bytes | None = None) -> tuple[int, bytes | None]:
        size, rest = super().parse_chunk_size(unreader, data)
        if size > MAX_CHUNK_SIZE:
            raise InvalidChunkSize(b"out of range")
        self.declared += size
        if self.max_body_size and self.declared > self.max_body_size:
            raise BadRequest(f"chunked body declares {self.declared} bytes, over max_body_size "
                             f"({self.max_body_size})", 413)
        return size, rest


class Request(message.Request):
    """gunicorn's request head parser, giving a head with too many fields
    the same 431 whatever their count. gunicorn_h1c's parser holds at most
    256 fields and calls a head with more an invalid request (400); only
    on that error path are the lines counted. With keep_case, the names'
    spellings go along (header_case.py)."""

    keep_case = False  # [server] preserve_header_case, set once per worker

    def _parse_fast(self, unreader: Any, buf: bytes) -> Any:
        try:
            rest = super()._parse_fast(unreader, buf)
        except InvalidRequestLine:
            end = buf.find(b"\r\n\r\n")
            lines = buf.count(b"\r\n", 0, end if end >= 0 else len(buf))
            if lines > self.limit_request_fields:  # the request line's CRLF, and one per field
                raise LimitRequestHeaders(f"more than {self.limit_request_fields} header fields") from None
            raise
        if self.keep_case:
            self.headers.append((header_case.SPELLINGS, header_case.fast_parsed()))
        return rest

    def parse_headers(self, data: bytes, from_trailer: bool = False) -> list[tuple[str, Any]]:
        headers: list[tuple[str, Any]] = super().parse_headers(data, from_trailer)
        if self.keep_case and not from_trailer:
            headers.append((header_case.SPELLINGS, header_case.head_parsed(data)))
        return headers


class RequestParser(parser.RequestParser):
    """gunicorn's, waiting for a keep-alive connection's next request in a
    lighter way (keepalive.py's loop calls await_next): the finished request is let go of
    first, then the wait for the next one's first byte happens before
    gunicorn's parser is entered. An idle connection then holds no request
    object, and its greenlet sleeps on a shorter C stack (a greenlet keeps a
    copy of it): about 2 KiB less per idle connection. The wait is where an
    idle connection is parked (keepalive.py)."""

    mesg_class = Request
    mesg: Request | None
    idle = False  # waiting, with nothing buffered, for the next request's first byte

    def __init__(self, cfg: Any, source: Any, source_addr: Any) -> None:
        super().__init__(cfg, source, source_addr)
        parsers[gevent.getcurrent()] = self

    def __next__(self) -> Request:
        self.await_next()
        request: Request = super().__next__()
        return request

    def await_next(self) -> None:
        """Once a request is finished: close (StopIteration), or wait until
        the next one starts to arrive."""
        if self.mesg is None:
            return
        if self._finished_with(self.mesg):
            raise StopIteration()
        self.mesg = None
        sock = getattr(self.unreader, "sock", None)
        # Bytes read ahead (pipelining), or decrypted ones TLS may hold: no wait.
        if sock is None or isinstance(sock, ssl.SSLSocket) or self.unreader.buf.seek(0, os.SEEK_END):
            return
        # Idle: the worker may park the connection now (throwing keepalive.Park).
        self.idle = True
        try:
            sock.recv(1, socket.MSG_PEEK)  # returns once a byte is in (or the client closed)
        finally:
            self.idle = False

    def quiet_after(self) -> bool:
        """Once the current request's response is done, may the connection
        wait for the next one afresh (a new parser)? Not when the request
        says close, its body is not all read, or bytes are read ahead."""
        mesg = self.mesg
        if mesg is None or mesg.should_close() or not _nothing_left(mesg.body):
            return False
        return not self.unreader.buf.seek(0, os.SEEK_END)

    def _finished_with(self, mesg: Request) -> bool:
        """Must the connection close after this message? (A helper, so that
        no frame waiting for the next request holds on to it.)"""
        return mesg.should_close() or not (_nothing_left(mesg.body) or self.finish_body())


# Each HTTP/1 connection greenlet's parser (the worker's idle timer looks at it).
parsers: dict[Any, RequestParser] = {}  # greenlet -> parser
