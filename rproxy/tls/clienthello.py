"""The server name (SNI) and ALPN offer of a TLS ClientHello, read from its bytes.

Python's `ssl` chooses the certificate (in its SNI callback) before the
client's ALPN offer is known, and a TLS-ALPN-01 validation (RFC 8737) is
told apart from an ordinary client only by that offer. So while such a
challenge is pending, the first bytes of a connection are peeked at and
parsed here before the TLS layer sees them.

Strict and bounded: the ClientHello may span several handshake records
(RFC 8446 §5.1), but no more than `MAX_SIZE` bytes are ever asked for;
anything that is not a well-formed ClientHello raises `Malformed`, and a
prefix of one raises `Incomplete`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Far more than any real ClientHello (post-quantum key shares make ~2 KiB).
MAX_SIZE = 16 * 1024
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_MAX_RECORD = 2 ** 14


class Incomplete(Exception):
    """The bytes so far are the start of a ClientHello: more are needed."""


class Malformed(ValueError):
    """Not a TLS ClientHello (or one larger than MAX_SIZE)."""


@dataclass(frozen=True)
class ClientHello:
    server_name: str | None  # lower-case, without a trailing dot; None without SNI
    alpn: tuple[str, ...] | None  # None: no ALPN extension


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, start: int = 0, end: int | None = None):
        self.data, self.pos, self.end = data, start, len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise Malformed(f"{what} runs past its enclosing field")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, size: int, what: str) -> "_Reader":
        """A length-prefixed field (a length of `size` bytes, then the field)."""
        n = self.number(size, f"{what} length")
        start = self.pos
        self.take(n, what)
        return _Reader(self.data, start, start + n)

    def done(self) -> bool:
        return self.pos == self.end


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake message the records of `data` carry, reassembled."""
    message = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            raise Incomplete()
        kind, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if kind != _HANDSHAKE or major != 3:
            raise Malformed("not a TLS handshake record")
        if length == 0 or length > _MAX_RECORD:
            raise Malformed(f"a TLS record of {length} bytes")
        if pos + 5 + length > MAX_SIZE:
            raise Malformed(f"a ClientHello over {MAX_SIZE} bytes")
        if len(data) < pos + 5 + length:
            raise Incomplete()
        message += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise Malformed("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(message[1:4], "big")
            if len(message) >= needed:
                if len(message) > needed:
                    raise Malformed("bytes after the ClientHello in its records")
                return bytes(message)


def parse(data: bytes) -> ClientHello:
    """The ClientHello at the start of `data` (the first bytes a client sent)."""
    message = _handshake_bytes(data)
    body = _Reader(message, 4)
    body.take(2 + 32, "version and random")
    body.vector(1, "session id")
    suites = body.vector(2, "cipher suites")
    if suites.end == suites.pos or (suites.end - suites.pos) % 2:
        raise Malformed("an empty or odd cipher suite list")
    body.vector(1, "compression methods")
    server_name = alpn = None
    if not body.done():
        extensions = body.vector(2, "extensions")
        if not body.done():
            raise Malformed("bytes after the extensions")
        seen = set()
        while not extensions.done():
            kind = extensions.number(2, "extension type")
            field = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise Malformed(f"extension {kind} appears twice")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                server_name = _server_name(field)
            elif kind == _EXT_ALPN:
                alpn = _protocols(field)
    return ClientHello(server_name, alpn)


def _server_name(field: _Reader) -> str | None:
    """RFC 6066 §3: a list of names, at most one of type host_name (0)."""
    names = field.vector(2, "server name list")
    if not field.done() or names.done():
        raise Malformed("a malformed server_name extension")
    host = None
    while not names.done():
        kind = names.number(1, "server name type")
        name = names.vector(2, "server name")
        if kind != 0:
            continue
        if host is not None:
            raise Malformed("two host names in server_name")
        raw = name.take(name.end - name.pos, "server name")
        try:
            host = raw.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            raise Malformed("a server name that is not ASCII") from None
        if not host:
            raise Malformed("an empty server name")
    return host


def _protocols(field: _Reader) -> tuple[str, ...]:
    """RFC 7301 §3.1: a non-empty list of non-empty protocol names."""
    names = field.vector(2, "protocol name list")
    if not field.done() or names.done():
        raise Malformed("a malformed ALPN extension")
    protocols = []
    while not names.done():
        name = names.vector(1, "protocol name")
        if name.done():
            raise Malformed("an empty ALPN protocol name")
        protocols.append(name.take(name.end - name.pos, "protocol name").decode("latin-1"))
    return tuple(protocols)
