"""What the proxy does to the client connection itself.

When a response goes out while part of the request body is still unread on
the connection (a 413, an upstream that answered early), the connection
cannot carry another request. Closing it at once would make the kernel reset
it over the unread bytes, and a reset can destroy the response before the
client reads it. So, like nginx's lingering close: send FIN after the
response, read and discard what the client still sends for a bounded time,
then close.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Iterable, Iterator

LINGER_SECONDS = 5.0
LINGER_BYTES = 16 << 20


class LingeringClose:
    """Wraps a response body; after it is fully written, linger and close."""

    __slots__ = ("body", "iterator", "sock", "finished")

    def __init__(self, body: Iterable[bytes], environ: dict[str, Any]) -> None:
        self.body = body
        self.iterator: Iterator[bytes] = iter(body)
        # Over HTTP/2 the socket carries other streams: nothing to close.
        h2 = environ.get("SERVER_PROTOCOL", "").startswith("HTTP/2")
        self.sock: socket.socket | None = None if h2 else environ.get("gunicorn.socket")
        self.finished = False

    def __iter__(self) -> LingeringClose:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.iterator)
        except StopIteration:
            self.finished = True
            raise

    def close(self) -> None:
        # Called by the WSGI server after the last byte is written.
        close = getattr(self.body, "close", None)
        if close is not None:
            close()
        if self.finished and self.sock is not None:
            linger(self.sock)


def linger(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(min(left, 1.0))
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        # Make the server's next read see the end, so it closes the socket.
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
