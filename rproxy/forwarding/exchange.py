"""The client side of one HTTP/1.1 exchange with an upstream server, on the
socket of a pooled urllib3 connection.

urllib3 connects (timeouts, TLS, SNI, verification) and pools; the exchange
itself is done here, because the request's headers are checked already and
http.client's per-request work (a header-by-header request builder, a file
object per response, the email package parsing every response head) was a
fifth of the proxy's CPU per request:

- the request head goes out in one send;
- the response head is read into one buffer (read_head, the tunnel's reader
  too) and split by hand; 1xx interim answers (100 Continue, 102, 103 Early
  Hints) are skipped, each shown to `interim` first (early_hints.py passes
  103s on to the client);
- the body is framed as RFC 9112 section 6.3 says (none for HEAD, 1xx, 204
  and 304; chunked; Content-Length; else until the upstream closes) and read
  as it arrives, in pieces of up to `n` bytes.

Transfer-Encoding: the only coding passed on is chunked, decoded here (the
client gets the body re-framed for its own connection). We never send TE
upstream, so an upstream may use no other coding (RFC 9112 section 7.4);
one that does (gzip, chunked; chunked, gzip; chunked twice; anything
unknown, over one header line or several) is refused as malformed rather
than guessed at: reading `chunked, gzip` until close, or passing `gzip,
chunked` on with its framing, would give the client bytes it cannot
decode. Transfer-Encoding overrides Content-Length (section 6.3, 3), which
is then dropped; in an HTTP/1.0 response it is faulty framing (section 6.1).

Errors are http.client's exceptions, so that callers tell them apart as
before: RemoteDisconnected (nothing came back), BadStatusLine, LineTooLong,
IncompleteRead (the head or body ended short) and HTTPException (malformed;
UnsupportedCoding for a transfer coding that cannot be passed on);
errors.py turns them into the client's answers.
"""

from __future__ import annotations

import re
import socket
from http.client import BadStatusLine, HTTPException, IncompleteRead, LineTooLong, RemoteDisconnected
from typing import Callable


class UnsupportedCoding(HTTPException):
    """The response's Transfer-Encoding cannot be passed on to the client."""


MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
_NO_BODY_STATUS = frozenset({204, 304})
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}").fullmatch


def request_head(method: str, target: str, headers: dict[str, str], chunked: bool = False,
                 extra: str = "", spelled: dict[str, str] | None = None) -> bytes:
    """The request head, ready to send (the values are checked already:
    see Forwarder._headers). `spelled` gives names another spelling (the
    client's, with preserve_header_case)."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    if spelled:
        lines += [f"{spelled.get(name, name)}: {value}\r\n" for name, value in headers.items()]
    else:
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    lines.append(extra)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class Headers(list[tuple[str, str]]):
    """The response's header pairs, in order, as received."""

    def get(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for key, value in self:
            if key.lower() == lname:
                return value
        return default

    def items(self) -> Headers:  # the pairs, as urllib3's HTTPHeaderDict gives them
        return self


# What a response's headers are once its head is taken: nothing, shared.
_TAKEN = Headers()


def read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read from `sock` (after `buf`, bytes already read) to the end of a
    response head: the head without its blank line, and the bytes after it.
    The one reader of response heads, for exchanges and tunnels alike."""
    end = buf.find(b"\r\n\r\n")
    while end < 0:
        if len(buf) > MAX_HEAD:
            raise LineTooLong("response head")
        data = sock.recv(65536)
        if not data:
            if buf:
                raise IncompleteRead(buf)
            raise RemoteDisconnected("Remote end closed connection without response")
        buf += data
        end = buf.find(b"\r\n\r\n")
    return buf[:end], buf[end + 4:]


class UpstreamResponse:
    """A response head, and its body read on demand with read1()."""

    __slots__ = ("sock", "status", "reason", "version", "headers", "chunked", "will_close",
                 "_buffer", "_left", "_chunk_left", "_done")

    def __init__(self, sock: socket.socket, method: str, buffered: bytes = b"",
                 interim: Callable[[int, Headers], None] | None = None) -> None:
        """Read the head from `sock` (after `buffered`, bytes of it already
        read); `interim(status, headers)` is called for each 1xx before the
        final answer."""
        self.sock = sock
        buf = buffered
        while True:
            head, buf = read_head(sock, buf)
            self._parse_head(head)
            # Interim answers are the upstream's business; the client gets
            # the final one. (101 on a plain request ends the exchange.)
            if not 100 <= self.status < 200 or self.status == 101:
                break
            if interim is not None:
                interim(self.status, self.headers)
        self._buffer = buf
        self._chunk_left = 0
        self._done = False
        self._left: int | None  # body bytes left: None until the upstream closes
        status = self.status
        if method == "HEAD" or status < 200 or status in _NO_BODY_STATUS:
            self.chunked = False
            self._left = 0
        else:
            self.chunked = self._chunked()
            self._left = None if self.chunked else self._content_length()
        if self._left == 0 and not self.chunked:
            self._done = True
        if status == 101 or (self._left is None and not self.chunked):
            self.will_close = True  # the body ends when the upstream closes

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if len(status_line) > MAX_HEAD:
            raise LineTooLong("status line")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise BadStatusLine(status_line.decode("latin-1"))
        version, code = parts[0], parts[1]
        if len(code) != 3 or not code.isdigit():
            raise BadStatusLine(status_line.decode("latin-1"))
        self.status = int(code)
        if self.status < 100:
            raise BadStatusLine(status_line.decode("latin-1"))
        self.reason = parts[2].strip().decode("latin-1") if len(parts) > 2 else ""
        self.version = 10 if version == b"HTTP/1.0" else 11
        if len(lines) > MAX_HEADERS + 1:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        headers = Headers()
        for raw in lines[1:]:
            line = raw.decode("latin-1")
            if line[:1] in (" ", "\t") and headers:
                # Obsolete line folding (RFC 9112 5.2): one value, spaces between.
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip()}")
                continue
            name, colon, value = line.partition(":")
            # A line without a colon keeps an invalid name: dropped on the way out.
            headers.append((name, value.strip(" \t\r") if colon else ""))
        self.headers = headers
        connection = (headers.get("Connection") or "").lower()
        if self.version == 10:
            self.will_close = "keep-alive" not in connection
        else:
            self.will_close = "close" in connection

    def _chunked(self) -> bool:
        """Is the body chunked? False when there is no Transfer-Encoding;
        any coding but chunked alone is refused (see the module's doc)."""
        lines = [v for k, v in self.headers if k.lower() == "transfer-encoding"]
        if not lines:
            return False
        # One list over all the lines (RFC 9110 5.3); empty elements ignored (5.6.1).
        codings = [c.strip(" \t").lower() for c in ",".join(lines).split(",")]
        codings = [c for c in codings if c]
        if codings != ["chunked"]:
            shown = ", ".join(lines)
            raise UnsupportedCoding(f"transfer coding {shown[:80]!r} cannot be passed on (only chunked)")
        if self.version == 10:
            raise UnsupportedCoding("Transfer-Encoding in an HTTP/1.0 response")
        return True

    def _content_length(self) -> int | None:
        values = {v.strip() for k, v in self.headers if k.lower() == "content-length"}
        if not values:
            return None
        if len(values) > 1:
            raise HTTPException(f"conflicting Content-Length values: {sorted(values)}")
        value = values.pop()
        if not value.isdigit():
            raise HTTPException(f"malformed Content-Length: {value[:40]!r}")
        return int(value)

    def head_taken(self) -> None:
        """The head is in the client's response now: its header pairs go, and
        the body is read with the framing alone (a held stream keeps what it
        reads with, not what it has answered)."""
        self.headers = _TAKEN

    @property
    def complete(self) -> bool:
        """The body was read to its end."""
        return self._done

    @property
    def buffered(self) -> bool:
        """Are bytes read from the socket waiting in the buffer?"""
        return bool(self._buffer)

    @property
    def reusable(self) -> bool:
        """May the connection carry another exchange now? Only after a
        complete body, when nothing stray follows it."""
        return self._done and not self.will_close and not self._buffer

    def read1(self, n: int) -> bytes:
        """Up to `n` body bytes, with at most one read from the socket; b""
        at the end. A body cut short raises IncompleteRead."""
        if self._done:
            return b""
        if self.chunked:
            return self._read_chunk(n)
        data = self._take(n if self._left is None else min(n, self._left))
        if not data:
            if self._left is None:  # read until close: the close is the end
                self._done = True
                return b""
            raise IncompleteRead(b"", self._left)
        if self._left is not None:
            self._left -= len(data)
            if not self._left:
                self._done = True
        return data

    def _take(self, n: int) -> bytes:
        """Buffered bytes first, else one read from the socket."""
        buf = self._buffer
        if buf:
            if len(buf) <= n:
                self._buffer = b""
                return buf
            self._buffer = buf[n:]
            return buf[:n]
        return self.sock.recv(n)

    def _line(self) -> bytes:
        """One CRLF-terminated line of the chunked framing."""
        buf = self._buffer
        while True:
            end = buf.find(b"\r\n")
            if end >= 0:
                self._buffer = buf[end + 2:]
                return buf[:end]
            if len(buf) > MAX_HEAD:
                raise LineTooLong("chunk size")
            data = self.sock.recv(65536)
            if not data:
                raise IncompleteRead(buf)
            buf += data
            self._buffer = buf

    def _read_chunk(self, n: int) -> bytes:
        while not self._chunk_left:
            size_line = self._line().split(b";", 1)[0].rstrip(b" \t")
            # Hex digits only: int() would also take "0x1a", "+5" or "1_0".
            if not _HEX(size_line):
                raise HTTPException(f"malformed chunk size: {size_line[:40]!r}")
            size = int(size_line, 16)
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                self._done = True
                return b""
            self._chunk_left = size
        data = self._take(min(n, self._chunk_left))
        if not data:
            raise IncompleteRead(b"", self._chunk_left)
        self._chunk_left -= len(data)
        if not self._chunk_left:
            self._chunk_end()
        return data

    def _chunk_end(self) -> None:
        """The CRLF after a chunk's data, read now if it is buffered (so that
        the body counts as complete as soon as its last byte is in)."""
        if len(self._buffer) >= 2:
            if self._buffer[:2] != b"\r\n":
                raise HTTPException("chunk data not followed by CRLF")
            self._buffer = self._buffer[2:]
        else:
            if self._line():
                raise HTTPException("chunk data not followed by CRLF")

