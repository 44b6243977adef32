"""Held streams without a greenlet.

An HTTP/1.x response whose body waits on its upstream (an event stream, a
long poll) for PARK_AFTER seconds, with its head and a first piece sent,
leaves its greenlet: the body's read raises HeldPark (a body may park once
the worker has set its `park_after`: bodies returned to gunicorn as they
are, on plain connections), gunicorn's handle_request lets it through with
the access line, the body's close and post_request skipped (`leaving`
marks the environ), and the connection's loop ends without closing the
socket. What the stream needs to go on (gunicorn's Response, the body, the
request) waits in a HeldStream, watched in the event loop: the upstream's
next bytes start a greenlet that relays them and waits again (parked again
after a while); the upstream's read_timeout cuts the client, as it would in
a greenlet; a client that closes frees the upstream connection at once. At
the body's end the stream finishes as gunicorn's handle_request does (the
response's end, the access line with the whole request time, the body's
close, post_request), and the connection waits for its next request parked
(parking.py), or is closed when the response or request says so.

A held stream keeps what a running one holds against the limits: its slot
in the listener's pool (worker_connections), its count in
max_connections_per_ip (its connection's and, behind a trusted proxy, its
request's). Stopping the listener (stop, reload, max_requests) resumes
each held stream in a greenlet in its slot, which relays it without parking
again, as a running stream goes on: until its end, or until the worker's
graceful_timeout kills the worker's greenlets (then it is cut, with its
access line). A pipelined client whose close the io watcher can no longer
see (its next request's bytes wait unread) is polled for it once a second,
as the worker's sweep does for running streams (client_left.py).

TLS clients are not parked: an SSL socket may hold decrypted bytes its
watcher cannot see, and its peer's close arrives as a close_notify record
to read, not as the end of the TCP stream.
"""

from __future__ import annotations

import logging
import ssl
import time
from datetime import timedelta
from typing import Any, Callable, Iterator

import gevent
from gevent import GreenletExit

from rproxy.server.client_left import ClientLeft, has_left, waiting
from rproxy.server.parking import PARK_AFTER, PARKED, ConnectionPool, Parked
from rproxy.server.sockets import wait_readable
from rproxy.server.takeover import client_socket

log = logging.getLogger("rproxy.worker")

# The environ key under which a body that parks leaves its Leaving.
HELD = "rproxy.held"

_READ = 1  # libev's EV_READ


class HeldPark(BaseException):
    """Raised by a body whose read waited PARK_AFTER: its stream parks. A
    BaseException, as ClientLeft: no handler of upstream or application
    errors takes it for one."""

    def __init__(self, body: Holdable) -> None:
        super().__init__()
        self.body = body


class Holdable:
    """A response body that may park its stream (UpstreamBody): the worker
    allows it when its stream may (may_park), and the body then raises
    HeldPark from a read that waited that long."""

    __slots__ = ()
    environ: dict[str, Any]
    finished: bool

    def allow_parking(self, after: float) -> None:
        """Park the stream when a wait for the next bytes lasts `after` seconds."""
        raise NotImplementedError

    def upstream(self) -> Any:
        """The socket the body waits on."""
        raise NotImplementedError

    def abandon(self, error: str) -> None:
        """The client left: the upstream connection is closed, `error` recorded."""
        raise NotImplementedError

    def timed_out(self) -> Exception:
        """The upstream sent nothing for read_timeout: the exception that cuts the client."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[bytes]:
        raise NotImplementedError


class Leaving:
    """What gunicorn's handle_request hands over as the stream leaves it
    (its access() and post_request calls, skipped for a leaving stream)."""

    __slots__ = ("resp", "request_time")

    def __init__(self) -> None:
        self.resp: Any = None
        self.request_time = timedelta(0)


def may_park(environ: dict[str, Any]) -> bool:
    """May this request's stream park? HTTP/1.x on a plain socket only."""
    sock = client_socket(environ)  # None over HTTP/2
    return sock is not None and not isinstance(sock, ssl.SSLSocket)


def leaving_post_request(hook: Callable[..., Any]) -> Callable[..., Any]:
    """gunicorn's post_request hook `hook`, run at a stream's end, not
    when it parks (then it takes gunicorn's Response for the stream)."""

    def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> Any:
        leaving = environ.get(HELD)
        if leaving is not None:
            leaving.resp = resp
            return None
        return hook(worker, req, environ, resp)

    return post_request


class Held(Exception):
    """Raised by the worker's handle_request for a stream that parked: its
    connection's loop ends, the socket left open (keepalive.py)."""

    def __init__(self, stream: HeldStream) -> None:
        super().__init__()
        self.stream = stream


# Why a held stream's greenlet starts.
_BYTES, _TIMEOUT, _LEFT, _STOPPED = range(4)

# Seconds between polls for the close of a client whose next request's bytes wait unread.
_LEFT_POLL = 1.0


class HeldStream:
    """One held stream: what it goes on with, its watchers and its timer."""

    __slots__ = ("worker", "body", "resp", "req", "sock", "addr", "counted", "started", "listener",
                 "release", "pool", "req_count", "proxy_protocol_info", "reusable", "upstream", "client",
                 "timer", "until")

    def __init__(self, worker: Any, body: Holdable, leaving: Leaving, req: Any, sock: Any, addr: Any,
                 counted: str | None) -> None:
        self.worker = worker
        self.body = body
        self.resp = leaving.resp
        self.req = req
        self.sock = sock
        self.addr = addr
        self.counted = counted  # the forwarded client's count, behind a trusted proxy
        self.started = time.monotonic() - leaving.request_time.total_seconds()
        self.listener: Any = None
        self.release: Callable[[], None] = _nothing
        self.pool: ConnectionPool | None = None
        self.req_count = 0
        self.proxy_protocol_info: Any = None
        self.reusable = False  # may the connection wait for another request after it?
        self.upstream: Any = None
        self.client: Any = None
        self.timer: Any = None
        self.until = 0.0  # when read_timeout ends the upstream's wait (loop time), 0: never

    def park(self, pool: ConnectionPool, release: Callable[[], None]) -> None:
        """Wait in the event loop (its greenlet is ending, its slot kept)."""
        self.pool, self.release = pool, release
        loop = self.worker._loop
        upstream = self.body.upstream()
        self.upstream = loop.io(upstream.fileno(), _READ)
        self.upstream.start(self._resume, _BYTES)
        self.client = loop.io(self.sock.fileno(), _READ)
        self.client.start(self._client_readable)
        timeout = upstream.gettimeout()
        if timeout:  # the body waited PARK_AFTER of it already
            self.timer = loop.timer(max(timeout - PARK_AFTER, 0.001))
            self.timer.start(self._resume, _TIMEOUT)
            self.until = loop.now() + timeout - PARK_AFTER
        pool.parked.add(self)
        log.debug("response to %s waits on its upstream: parked", _peer(self.addr))

    def _unwatch(self) -> None:
        assert self.pool is not None
        self.pool.parked.discard(self)
        for watcher in (self.upstream, self.client, self.timer):
            if watcher is not None:
                watcher.close()
        self.upstream = self.client = self.timer = None

    def _client_readable(self) -> None:
        if has_left(self.sock.fileno()):
            self._resume(_LEFT)
        else:
            # Bytes of its next request, read after this response: the
            # watcher would fire on them again and again, and would not see
            # the close behind them; a poll (POLLRDHUP) does.
            self.client.close()
            self.client = self.worker._loop.timer(_LEFT_POLL, _LEFT_POLL)
            self.client.start(self._client_polled)

    def _client_polled(self) -> None:
        if has_left(self.sock.fileno()):
            self._resume(_LEFT)

    def _resume(self, why: int) -> None:
        self._unwatch()
        assert self.pool is not None
        self.pool.resume(relay, self, why)

    def stop(self) -> None:
        """The listener stops: the stream goes on in a greenlet in its slot,
        not parked again (the worker no longer alive), so that the worker's
        graceful wait counts it and kills it at graceful_timeout."""
        self._resume(_STOPPED)


def _nothing() -> None:
    pass


def _peer(addr: Any) -> str:
    return addr[0] if isinstance(addr, tuple) else "-"


# What a connection handler returns when a held stream it would have parked
# was relayed to its end in its greenlet instead, its connection closed and released.
RELAYED = object()


def relay_here(stream: HeldStream, release: Callable[[], None]) -> object:
    """Relay a stream that would park now, without parking (the worker
    stops), in its own greenlet."""
    stream.release = release
    relay(stream)
    return RELAYED


def relay(stream: HeldStream, why: int = _BYTES) -> object:
    """A held stream's greenlet: relay the body until it waits again
    (PARKED) or ends; then finish the request as gunicorn's handle_request
    does, and park the connection for its next request or close it."""
    worker, body, resp, sock = stream.worker, stream.body, stream.resp, stream.sock
    me = gevent.getcurrent()
    environ = body.environ
    peer = _peer(stream.addr)
    keep = False
    waiting.serving(me, sock.fileno())
    try:
        sock.settimeout(worker.client_timeout)
        if why == _LEFT:
            body.abandon("client left mid-response")
            raise ClientLeft()
        if why == _TIMEOUT:
            raise body.timed_out()
        if why == _STOPPED and stream.until:
            _rest_of_wait(stream)
        while True:
            if not worker.alive or stream.pool is None:
                # Stopping: relayed here to its end, as a running stream
                # is, the worker's graceful_timeout bounding it.
                body.allow_parking(0)
            try:
                for item in body:
                    resp.write(item)
                break
            except HeldPark:  # the worker may have stopped during the wait
                environ.pop(HELD, None)  # nothing for gunicorn to hand over this time
                if worker.alive and stream.pool is not None:
                    stream.park(stream.pool, stream.release)
                    return PARKED
        resp.close()
        keep = stream.reusable and not resp.should_close()
    except GreenletExit:  # graceful_timeout ended: the worker kills its greenlets
        body.abandon("worker stopping")
        log.info("held response to %s cut: the worker's graceful_timeout ended", peer)
    except ClientLeft:
        log.debug("client %s left during a held response: closed", peer)
    except TimeoutError:
        log.info("client %s did not read a held response for %gs: closed", peer, worker.client_timeout)
    except OSError as e:
        log.debug("held response to %s cut: %s", peer, e)
    except Exception:
        worker.log.exception("Error handling request")
    finally:
        waiting.served(me)
    _finish(stream)
    if keep and worker.alive and worker.keepalive_timeout:
        sock.settimeout(None)
        assert stream.pool is not None
        Parked(sock, stream.listener, stream.addr, stream.req_count, stream.proxy_protocol_info,
               stream.pool, stream.release).watch(worker._loop, worker.keepalive_timeout)
        return PARKED
    sock.close()
    stream.release()
    return None


def _rest_of_wait(stream: HeldStream) -> None:
    """Resumed by the stop, not by its upstream's bytes: wait for them the
    rest of read_timeout (the body's read would wait a whole one again)."""
    body = stream.body
    me = waiting.begins()
    try:
        arrived = wait_readable(body.upstream(), max(stream.until - stream.worker._loop.now(), 0.001))
    except ClientLeft:
        body.abandon("client left mid-response")
        raise
    finally:
        waiting.discard(me)
    if not arrived:
        raise body.timed_out()


def _finish(stream: HeldStream) -> None:
    """What gunicorn's handle_request does after its write loop."""
    worker, body, resp, req = stream.worker, stream.body, stream.resp, stream.req
    environ = body.environ
    try:
        worker.log.access(resp, req, environ, timedelta(seconds=time.monotonic() - stream.started))
        body.close()
        try:
            worker.cfg.post_request(worker, req, environ, resp)
        except Exception:
            worker.log.exception("Exception in post_request hook")
    finally:
        if stream.counted is not None and worker.per_address is not None:
            worker.per_address.leave(stream.counted)
