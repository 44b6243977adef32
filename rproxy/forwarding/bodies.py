"""The two bodies of an exchange, and the pooled connection they ride on.

RequestBody streams the client's body upstream as it arrives (kept for one
resend while small), with the client's failures translated by errors.py.
UpstreamBody streams the upstream's answer back: the connection goes back to
its pool as soon as the last byte is in, and a cut upstream cuts the client
(a truncated answer, never a complete-looking one). A Release says what
becomes of the connection: back to its pool, or closed.
"""

from __future__ import annotations

import logging
import socket
from typing import Protocol

import gevent
from urllib3.connection import HTTPConnection

from rproxy.forwarding.errors import (
    EXCHANGE_FAILURES,
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    ClientTimeout,
    client_body_error,
    describe,
)
from rproxy.forwarding.exchange import UpstreamResponse
from rproxy.messages import Request
from rproxy.server.client_left import ClientLeft, waiting
from rproxy.server.cuts import cut_client
from rproxy.server.held import HELD, HeldPark, Holdable, Leaving
from rproxy.server.sockets import readable_now, wait_readable
from rproxy.upstreams.servers import Server

log = logging.getLogger("rproxy.forward")

CHUNK = 64 * 1024
# Request bodies up to this size are read before sending, so that the request
# can be sent again if a stale keep-alive connection drops it.
REPLAYABLE_BODY = 64 * 1024


class RequestBody:
    """The client's body as an iterable of chunks for urllib3, read as it is sent.

    A small body is read whole first, so that it can be sent again. Of a
    larger one the first chunk is read before any upstream is chosen: a client
    that declares a body and then stalls (a slow-body attack) holds no
    upstream connection, only its own, until client_timeout cuts it."""

    __slots__ = ("stream", "remaining", "limit", "deadline", "sent", "complete", "buffered", "first",
                 "streaming")

    def __init__(self, request: Request, limit: int, deadline: float | None):
        self.stream = request.environ["wsgi.input"]
        self.remaining = request.content_length  # None when chunked
        self.limit = limit
        self.deadline = deadline  # for each chunk, however it trickles in
        self.sent = 0
        self.complete = False
        self.buffered: bytes | None = None
        self.first = b""
        self.streaming = False
        if self.remaining is not None and self.remaining <= REPLAYABLE_BODY:
            self.buffered = b"".join(self)
        else:
            self.first = self._read()

    @property
    def replayable(self) -> bool:
        return self.buffered is not None or not self.streaming

    def payload(self) -> bytes | RequestBody:
        return self.buffered if self.buffered is not None else self

    def __iter__(self) -> RequestBody:
        return self

    def __next__(self) -> bytes:
        if not self.streaming:
            self.streaming = True
            if self.first:
                return self.first
        data = self._read()
        if not data:
            raise StopIteration
        return data

    def _read(self) -> bytes:
        """The next chunk; b"" once the body is complete."""
        if self.complete:
            return b""
        want = CHUNK if self.remaining is None else min(CHUNK, self.remaining)
        timer = gevent.Timeout.start_new(self.deadline) if self.deadline and want else None
        try:
            data = self.stream.read(want) if want else b""
        except gevent.Timeout as e:
            if e is not timer:
                raise
            raise ClientTimeout(f"body slower than min_body_rate, after {self.sent} bytes") from None
        except Exception as e:
            raise client_body_error(e, self.sent) from None
        finally:
            if timer is not None:
                timer.close()
        if not data:
            if self.remaining:
                raise ClientGone(f"body ended {self.remaining} bytes short")
            self.complete = True
            return b""
        self.sent += len(data)
        if self.limit and self.sent > self.limit:
            raise BodyTooLarge()
        if self.remaining is not None:
            self.remaining -= len(data)
        return data


class Release(Protocol):
    """Hands an exchange's connection back: to its pool when `reusable`, else closed."""

    def __call__(self, reusable: bool) -> None: ...


class UpstreamBody(Holdable):
    """The upstream's response body, read as it arrives. The WSGI server
    calls close() when done, also when the client went away mid-way.
    `release(reusable)` hands the connection back (or closes it). Of the
    request it keeps what it reports with, not the request itself (its
    headers, target and path): a held stream lives for hours. With
    `park_after` set by the worker, a wait for the next bytes that lasts
    that long parks the stream (server/held.py)."""

    __slots__ = ("response", "record", "request_id", "environ", "label", "release", "finished", "first",
                 "park_after")

    def __init__(self, response: UpstreamResponse, request: Request, label: str, release: Release) -> None:
        self.response = response
        self.record = request.record
        self.request_id = request.request_id
        self.environ = request.environ
        self.label = label
        self.release = release
        self.finished = False
        self.first = b""
        self.park_after = 0.0

    def start(self) -> None:
        """Read the first piece of the body before anything goes to the
        client. The response head goes out with that piece anyway (in one
        send, see response_writer; over HTTP/2 both are sent in the same
        turn of the loop), so this costs no latency; and an upstream that fails
        between its head and its first body byte (closes, resets, times
        out) raises here, while the client can still get a 502 or 504
        instead of a cut connection. The connection is released on error."""
        response = self.response
        try:
            if not response.complete:
                self.first = response.read1(CHUNK)
        except TimeoutError:
            self._done(reusable=False)
            raise BodyTimeout() from None
        except BaseException:
            self._done(reusable=False)
            raise
        if response.complete:
            self._done(reusable=response.reusable)

    def __iter__(self) -> UpstreamBody:
        return self

    def __next__(self) -> bytes:
        if self.first:
            data, self.first = self.first, b""
            return data
        if self.finished:
            raise StopIteration
        response = self.response
        me = waiting.begins()
        try:
            if self.park_after and self._waits_long(response):
                self.environ[HELD] = Leaving()
                raise HeldPark(self)
            data = response.read1(CHUNK)
        except ClientLeft:  # the connection is closed, not given back half-read
            self.abandon("client left mid-response")
            raise
        except EXCHANGE_FAILURES as e:
            raise self._cut(e) from None
        finally:
            waiting.discard(me)
        if response.complete:
            # The connection goes back to its pool as soon as the body is in,
            # before this last piece is written to the client.
            self._done(reusable=response.reusable)
        if data:
            return data
        raise StopIteration

    def _waits_long(self, response: UpstreamResponse) -> bool:
        """Did the upstream send nothing for park_after (a shorter
        read_timeout is left to the read itself)?"""
        sock = response.sock
        if response.buffered or readable_now(sock) is not False:  # bytes in: no wait (a peek, no switch)
            return False
        timeout = sock.gettimeout()
        if timeout is not None and timeout <= self.park_after:
            return False
        return not wait_readable(sock, self.park_after)

    def _cut(self, e: BaseException) -> Exception:
        """The upstream failed mid-body: the exception that cuts the client."""
        self._done(reusable=False)
        reason = describe(e)
        self.record.error = f"upstream cut mid-body: {reason}"
        log.warning("upstream %s cut the response mid-body (%s); cutting the client too, "
                    "request_id=%s", self.label, reason, self.request_id)
        return cut_client(self.environ, f"upstream {self.label} cut the response: {reason}")

    def allow_parking(self, after: float) -> None:
        self.park_after = after

    def upstream(self) -> socket.socket:
        return self.response.sock

    def abandon(self, error: str) -> None:
        self._done(reusable=False)
        self.record.error = error

    def timed_out(self) -> Exception:
        return self._cut(TimeoutError("timed out"))

    def close(self) -> None:
        if HELD in self.environ:  # its stream is parking, not ending (gunicorn closes the body as it leaves)
            return
        self._done(reusable=False)

    def _done(self, reusable: bool) -> None:
        if not self.finished:
            self.finished = True
            self.release(reusable)


class Lease:
    """A connection taken from a server's pool, to give back once, whichever
    of the paths out of an exchange gets there first (a body's error and a
    client leaving can both try)."""

    __slots__ = ("server", "conn", "returned")

    def __init__(self, server: Server, conn: HTTPConnection) -> None:
        self.server, self.conn, self.returned = server, conn, False

    def __call__(self, reusable: bool) -> None:
        if not self.returned:
            self.returned = True
            _release(self.server, self.conn, reusable)


def _release(server: Server, conn: HTTPConnection, reusable: bool) -> None:
    """Back to the pool; a connection in an unknown state goes back closed."""
    server.end()
    if not reusable:
        conn.close()
    server.pool._put_conn(conn)
