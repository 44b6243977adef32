"""The client socket of an HTTP/2 connection, and its one writer.

Reads are timed by settimeout() (the connection's reader: keepalive when
idle). Writes are the writer's alone: the frames h2 queues (responses,
resets, WINDOW_UPDATEs, settings and ping ACKs, GOAWAY) are handed to
queue() by every path that queues them, and one greenlet, started from a
loop callback, runs in the same turn of the worker's loop, after the
greenlets already woken in it: the frames of all the streams that ran in a
turn go out in one send, one TLS record. It sends until nothing is left and
only then ends, so no frame waits for a later write. A greenlet that finds
WRITE_AHEAD bytes or more waiting for the writer waits until the writer took
them (a response is held in memory at most that far ahead of the socket).
A write that makes no progress for its timeout (the client reads nothing)
breaks the connection: nothing more is written, and `failed` is called.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from gevent import Timeout, get_hub, getcurrent, spawn_raw
from gevent.event import Event
from gunicorn.http2.errors import HTTP2ConnectionError

log = logging.getLogger("rproxy.http2")

# Bytes of frames a connection may hold for its writer before a greenlet
# that adds more waits for the writer to take them: four full DATA frames,
# while a turn's worth of small responses (about 200 bytes each with their
# HEADERS) stays far below it.
WRITE_AHEAD = 65536


class FrameSocket:
    """The client socket as gunicorn's HTTP/2 connection uses it, writing
    through the connection's one writer. `pending()` gives frames queued in
    h2 by no path that hands them over (the writer takes them too);
    `failed()` is told when a write fails."""

    def __init__(self, sock: Any, write_timeout: float | None) -> None:
        sock.settimeout(None)
        self._sock = sock
        self._read_timeout: float | None = None
        self._write_timeout = write_timeout
        self._hub = get_hub()
        self._queued: list[bytes] = []  # frames in order, for the writer
        self._queued_size = 0
        self._writing = False           # the writer is scheduled or running
        self._broken = False            # a write failed: nothing more goes out
        self._draining = False          # drain() waits for the writer to end
        self._taken = Event()           # set (and replaced) when the writer takes a full queue, fails or drains
        self.pending: Callable[[], bytes] = bytes
        self.failed: Callable[[], None] = lambda: None

    def settimeout(self, seconds: float | None) -> None:
        self._read_timeout = seconds

    def gettimeout(self) -> float | None:
        return self._read_timeout

    def recv(self, size: int) -> bytes:
        with Timeout(self._read_timeout, TimeoutError("timed out")):
            data: bytes = self._sock.recv(size)
            return data

    def sendall(self, data: bytes) -> None:
        """Queue `data` for the writer (gunicorn's own sendall calls too)."""
        if self._broken:
            raise HTTP2ConnectionError("Socket write error: an earlier write failed")
        self._queued.append(data)
        self._queued_size += len(data)
        if not self._writing:
            # spawn_raw starts the writer from a loop callback: it runs in
            # this turn of the loop, before the loop polls again, and after
            # the greenlets already woken in this turn queued their frames.
            self._writing = True
            spawn_raw(self._write)
        if self._queued_size >= WRITE_AHEAD and getcurrent() is not self._hub:
            while self._queued_size >= WRITE_AHEAD and not self._broken:
                self._taken.wait()

    def drain(self) -> None:
        """Wait until the writer has sent what is queued (or failed): the
        socket may be closed after."""
        if not self._writing and not self._broken:
            late = self.pending()
            if late:
                self.sendall(late)
        self._draining = True
        while self._writing:
            self._taken.wait()

    def _wake(self) -> None:
        taken, self._taken = self._taken, Event()
        taken.set()

    def _write(self) -> None:
        try:
            while True:
                late = self.pending()  # queued in h2 meanwhile, by no path that handed it over
                if late:
                    self._queued.append(late)
                    self._queued_size += len(late)
                if not self._queued:
                    return  # checked with no yield before _writing is cleared below
                queued, self._queued = self._queued, []
                if self._queued_size >= WRITE_AHEAD:
                    self._wake()
                self._queued_size = 0
                with Timeout(self._write_timeout, TimeoutError("write timed out")):
                    self._sock.sendall(queued[0] if len(queued) == 1 else b"".join(queued))
        except Exception as e:
            if isinstance(e, OSError):
                log.debug("HTTP/2 connection write failed: %s", e)
            else:
                log.exception("HTTP/2 connection write failed")
            self._broken = True
            self._queued.clear()
            self._queued_size = 0
            self._wake()
            self.failed()
        finally:
            self._writing = False
            if self._draining:
                self._wake()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
