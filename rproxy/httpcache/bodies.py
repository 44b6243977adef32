"""Upstream response bodies as the cache handles them: passed on while a copy
is kept (Tee), read whole up to a bound, drained so that the connection is
reused, or discarded unread so that it is not.
"""

from __future__ import annotations

from rproxy.messages import Response


class Tee:
    """Passes a body through, keeping a copy up to `limit`, for the cache;
    `on_end` gets the copy at the end, or None when the body was too large or
    was not read to its end.

    With the body's `length` known (Content-Length), the copy is handed over
    before its last chunk goes on: a client that has the whole response can
    count on the next request, to any worker or instance, finding it stored."""

    __slots__ = ("body", "iterator", "kept", "limit", "length", "done", "on_end")

    def __init__(self, body, limit: int, on_end, length: int | None = None):
        self.body, self.iterator, self.limit, self.on_end = body, iter(body), limit, on_end
        self.length = length
        self.kept: bytearray | None = bytearray()
        self.done = False

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            chunk = next(self.iterator)
        except StopIteration:
            self._end(bytes(self.kept) if self.kept is not None else None)
            raise
        if self.kept is not None:
            self.kept += chunk
            if len(self.kept) > self.limit:
                self.kept = None  # too large for the cache: stream on, keep nothing
            elif len(self.kept) == self.length:
                self._end(bytes(self.kept))
        return chunk

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()
        self._end(None)

    def _end(self, body: bytes | None) -> None:
        if not self.done:
            self.done = True
            self.on_end(body)


def drain(response: Response) -> None:
    """Reads a 304's empty body: that releases the connection for reuse."""
    for _ in response.body:
        pass


def discard(response: Response) -> None:
    """Done with an upstream response unread: its connection is not reused."""
    close = getattr(response.body, "close", None)
    if close is not None:
        close()


def read_whole(response: Response, limit: int) -> bytes | None:
    """The whole body, or None when it is larger than `limit`."""
    kept = bytearray()
    try:
        for chunk in response.body:
            kept += chunk
            if len(kept) > limit:
                return None
    finally:
        discard(response)
    return bytes(kept)
