"""rproxy's gunicorn worker: gevent's, guarding each client connection, and
serving the streams of an HTTP/2 connection side by side (see http2.py).

What a proxy in front of everything must bound before any request reaches
the app:
- the first request head must arrive within `client_header_timeout`, each
  next one within `keepalive` (slowloris): 408, or a quiet close when the
  connection was just idle (deadlines.py);
- once a head is in, a client that stops sending its body or stops reading
  the response is dropped after `client_timeout`, which frees its greenlet,
  its socket and the upstream connection behind it;
- `max_connections_per_ip` caps what one address may hold (429);
- a head with more than `max_headers` fields gets 431 whatever the count,
  and the rest of an oversized head is read and dropped before closing, so
  that the client, still sending, reads the answer;
- each chunk size of a request body is judged as soon as its line is in,
  before any of it goes upstream: 413 past `max_body_size`, 400 if absurd
  (request_parser.py);
- running out of file descriptors pauses accepting (gevent backs off up to a
  second) with a log line instead of a traceback per failed accept.

And what gunicorn's own per-request and per-connection work costs, trimmed
where it runs in this process (docs/performance.md): settings read as plain
attributes, the forwarding trust remembered per address, a keep-alive
connection's wait for its next request at the top of its stack, holding no
finished request (request_parser.py, Acceptor), and, idle for a second, no
greenlet either (keepalive.py's loop parks it: parking.py), nor a streamed
response waiting on its upstream for a second (held.py), the response
writer of response_writer.py.

And no signal sent to a worker is lost while it boots (hold_signals_across_fork).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import time
from types import TracebackType
from typing import Any, Callable, Iterable

import gevent
import gunicorn.http
from gevent.baseserver import BaseServer
from gevent.server import StreamServer
from gunicorn.http import message
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

from rproxy.client_address import Forwarding
from rproxy.server import header_case, http2, keepalive, response_writer
from rproxy.server.admission import AddressCounts, refuse
from rproxy.server.client_left import ClientLeft, waiting
from rproxy.server.deadlines import Deadlines, HeadTimeout
from rproxy.server.held import HELD, Held, HeldPark, HeldStream, Holdable, leaving_post_request, may_park, relay_here
from rproxy.server.http2_requests import http1_framing
from rproxy.server.lingering_close import linger
from rproxy.server.listeners import handshake_done
from rproxy.server.parking import PARK_AFTER, PARKED, ConnectionPool, Parked
from rproxy.server.request_parser import ChunkedReader, Request, RequestParser, parsers
from rproxy.server.takeover import TAKEN_OVER

log = logging.getLogger("rproxy.worker")

def settle_settings(cfg: Any) -> None:
    """gunicorn reads each setting through Config.__getattr__ (a lookup and
    a method call), some twenty times a request; a worker's settings never
    change (a reload starts new workers), so they become plain attributes,
    found before __getattr__ is asked. Properties (is_ssl, ...) still run."""
    for name, setting in cfg.settings.items():
        cfg.__dict__[name] = setting.get()


TrustCheck = Callable[[str, Any, Any], bool]


def _remembered_trust(in_allow_list: TrustCheck) -> TrustCheck:
    """gunicorn parses the peer's address with ipaddress for every request to
    decide whether it may send forwarding headers: the answer, remembered per
    address (and allow list, which is fixed per worker)."""
    known: dict[tuple[str, int], bool] = {}

    def remembered(address: str, allow_list: Any, networks: Any) -> bool:
        key = (address, id(networks))
        trusted = known.get(key)
        if trusted is None:
            if len(known) >= 65536:  # clients choose their addresses: bounded
                known.clear()
            trusted = known[key] = in_allow_list(address, allow_list, networks)
        return trusted

    return remembered


def _nothing_to_release() -> None:
    pass


class Acceptor(StreamServer):
    """gevent's, starting each connection's greenlet on the worker's handler
    itself. gevent's own start wraps it in a function that closes the socket
    after (Worker.handle does), called with *args: a level of C stack more
    under every connection, and an idle one keeps a copy of it (0.5 KiB)."""

    def do_handle(self, *args: Any) -> None:
        try:
            if self._spawn is None:
                self._handle(*args)
            else:
                self._spawn(self._handle, *args)
        except BaseException:
            self.do_close(*args)
            raise

    def wrap_socket_and_handle(self, client_socket: socket.socket, address: Any) -> Any:
        # The handler of every listener once TLS is configured (plain ones get
        # their socket back unwrapped: listeners.py). gevent's closes the
        # socket when the handler returns; the worker's closes it itself,
        # except when it has parked it (parking.py).
        try:
            sock = self.wrap_socket(client_socket, **self.ssl_args)
        except BaseException:
            client_socket.close()
            raise
        return self.handle(sock, address)

    def close(self) -> None:
        # Stopping (stop, reload, max_requests): parked connections close now
        # rather than at their keepalive timeout.
        super().close()
        if isinstance(self.pool, ConnectionPool):
            self.pool.stop_parked()


# The signals gunicorn sets up in a worker (SIGCHLD aside: the worker's own
# children's, which gevent may watch). From the fork until gunicorn's
# init_signals (after gevent's patching) the new worker runs the master's
# handlers, which only queue a signal for the master's loop, and that loop
# does not run in the child: a TERM sent then (a reload or a stop during
# start-up) was lost, and the worker served the old config until the master
# stopped, which then waited graceful_timeout for it.
_WORKER_SIGNALS = frozenset(GeventWorker.SIGNALS) - {signal.SIGCHLD}
# Blocked by hold_signals_across_fork: in the master until fork returns, in
# the new worker until its own handlers are in place.
_held: frozenset[signal.Signals] = frozenset()


def hold_signals_across_fork(worker: Any) -> None:
    """In the master, just before it forks `worker` (gunicorn's pre_fork):
    block the worker's signals, so that those sent to the new process wait,
    pending, until it can handle them itself (Worker.init_signals). The
    master takes its own back as soon as fork returns."""
    global _held
    if isinstance(worker, Worker):  # another worker class would never release them
        _held = _WORKER_SIGNALS - signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)


def _release_held() -> None:
    global _held
    if _held:
        held, _held = _held, frozenset()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


os.register_at_fork(after_in_parent=_release_held)


class Worker(GeventWorker):

    def init_signals(self) -> None:
        super().init_signals()
        _release_held()  # what was sent since the fork is delivered now, to these handlers

    def run(self) -> None:
        server = self.wsgi.config.server
        self.header_timeout = server.client_header_timeout
        self.keepalive_timeout = server.keepalive
        self.client_timeout = server.client_timeout
        self.forwarding = Forwarding(server.trusted_proxies)
        self.per_address = AddressCounts(server.max_connections_per_ip) if server.max_connections_per_ip else None
        self._out_of_fds_logged = 0.0
        hub = gevent.get_hub()
        self._loop = hub.loop
        self._deadlines = Deadlines(hub.loop, self.header_timeout, self.keepalive_timeout)
        # HTTP/1.x requests waiting on their upstream whose client has closed: cut (client_left.py).
        self._sweep = hub.loop.timer(1.0, 1.0, ref=False)
        self._sweep.start(waiting.sweep)
        self._hub_handle_error = hub.handle_error
        hub.handle_error = self._hub_error
        # In this worker process, gunicorn's and gevent's parts are ours where
        # they cost per request or per connection: the response writer (head
        # and first body piece in one send), the parser and the server (an
        # idle connection's wait), the forwarding trust check, the settings.
        response_writer.install(server.server_header)
        gunicorn.http.RequestParser = RequestParser
        ChunkedReader.max_body_size = server.max_body_size
        if server.preserve_header_case:
            header_case.install(self.cfg)
            Request.keep_case = True
        message.ChunkedReader = ChunkedReader
        ggevent.StreamServer = Acceptor
        self._pools: list[ConnectionPool] = []
        ggevent.Pool = self._new_pool
        message._ip_in_allow_list = _remembered_trust(message._ip_in_allow_list)
        settle_settings(self.cfg)
        # A held stream that parks leaves gunicorn's handle_request before its end (held.py).
        self.cfg.__dict__["post_request"] = leaving_post_request(self.cfg.post_request)
        # gevent records each greenlet's spawning stack and parent for its
        # debugging tools: per connection, CPU and memory nobody reads.
        gevent.config.track_greenlet_tree = False
        # gunicorn reads SCRIPT_NAME from os.environ for every request, and
        # os.environ raises (and catches) a KeyError for an unset name: set,
        # empty, it means the same (mounted at the root) without that cost.
        os.environ.setdefault("SCRIPT_NAME", "")
        try:
            super().run()
        finally:
            flush = getattr(self.log, "flush_access", None)  # lines of the last loop turn
            if flush is not None:
                flush()

    def _new_pool(self, size: int) -> ConnectionPool:
        pool = ConnectionPool(size)
        pool.serve_parked = self.serve_parked
        self._pools.append(pool)
        return pool

    # The head deadline replaces gunicorn's keep-alive timer (which also
    # does not apply to the first request, nor at all with keepalive = 0).
    def handle(self, listener: Any, client: socket.socket, addr: Any) -> object:
        address = addr[0] if isinstance(addr, tuple) else ""
        release = _nothing_to_release
        if self.per_address is not None and not self.forwarding.is_trusted(address):
            if not self.per_address.enter(address):
                log.warning("client %s already holds %d connections (max_connections_per_ip): "
                            "429 and closed", address, self.per_address.limit)
                refuse(client, "429 Too Many Requests", "too many connections from your address", 1)
                client.close()
                return None
            release = functools.partial(self.per_address.leave, address)
        if client.family != socket.AF_UNIX:
            # Streamed responses go out in small writes (events, chunks): without
            # this, Nagle holds each until the client ACKs the one before
            # (up to 40 ms with delayed ACKs). nginx's tcp_nodelay, likewise.
            with contextlib.suppress(OSError):  # a client already gone: the loop sees it
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setblocking(True)  # as gunicorn's: accepted sockets take the default timeout
        self._deadlines.first_head()
        return self._serve(listener, client, addr, release)

    def serve_parked(self, parked: Parked) -> object:
        """A parked connection's next request is coming: the rest of its
        keep-alive time is the deadline for the head."""
        self._deadlines.resumed(parked.until)
        return self._serve(parked.listener, parked.sock, parked.addr, parked.release, parked)

    def _serve(self, listener: Any, client: socket.socket, addr: Any, release: Callable[[], None],
               parked: Parked | None = None) -> object:
        """The connection's loop (keepalive.py); PARKED when it ends parked
        (or its response is held: held.py)."""
        me = gevent.getcurrent()
        ended: object = None
        try:
            to_park = keepalive.serve(self, listener, client, addr, parked)
            if isinstance(to_park, HeldStream):
                pool = next((pool for pool in self._pools if me in pool), None)
                to_park.listener = listener
                if pool is None or not self.alive:  # stopping: relayed to its end here, not parked
                    self._deadlines.head_in(me)  # no next-head deadline thrown into the relay
                    ended = relay_here(to_park, release)
                else:
                    to_park.park(pool, release)
                    ended = PARKED
            elif to_park is not None:
                pool = next((pool for pool in self._pools if me in pool), None)
                if pool is None or not self.alive:
                    client.close()
                else:
                    req_count, proxy_protocol_info = to_park
                    Parked(client, listener, addr, req_count, proxy_protocol_info, pool, release).watch(
                        self._loop, self.keepalive_timeout - PARK_AFTER)
                    ended = PARKED
        finally:
            self._deadlines.end(me)
            parsers.pop(me, None)
            if ended is None:
                release()
                client.close()  # the loop closes it already, except when it raised
        return ended

    def handle_http2(self, listener: Any, client: socket.socket, addr: Any, preface: bytes = b"",
                     upgrade: Any = None) -> None:
        # An HTTP/2 connection has its own idle and stream timeouts: no head deadline.
        self._deadlines.head_in(gevent.getcurrent())
        http2.serve_connection(self, listener, client, addr, preface, upgrade)

    def handle_http2_request(self, listener_name: Any, req: Any, sock: Any, addr: Any, h2_conn: Any) -> None:
        http1_framing(req)
        super().handle_http2_request(listener_name, req, sock, addr, h2_conn)

    def is_already_handled(self, respiter: Iterable[bytes]) -> bool:
        # The core took the connection over (server/takeover.py): gunicorn
        # must neither write to it nor read another request from it, and its
        # keep-alive loop ignores handle_request's answer, so end the loop as
        # gunicorn ends it for "close" (its socket object is closed; the new
        # owner keeps its own reference to the connection).
        if respiter is TAKEN_OVER:
            raise StopIteration("connection taken over")
        if isinstance(respiter, Holdable) and not respiter.finished and may_park(respiter.environ):
            respiter.allow_parking(PARK_AFTER)
        handled: bool = super().is_already_handled(respiter)
        return handled

    def handle_request(self, listener_name: Any, req: Any, sock: socket.socket, addr: Any) -> Any:
        me = gevent.getcurrent()
        self._deadlines.head_in(me)
        counted = self._forwarded_client(req, addr)
        sock.settimeout(self.client_timeout)
        waiting.serving(me, sock.fileno())
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except HeldPark as park:
            stream = HeldStream(self, park.body, park.body.environ.pop(HELD), req, sock, addr, counted)
            counted = None  # the held stream holds it now
            raise Held(stream) from None
        except ClientLeft:  # its client closed the connection while the body waited on the upstream
            log.debug("client %s left during the response of %s %s: closed",
                      addr[0] if isinstance(addr, tuple) else "-", req.method, req.path)
            raise StopIteration() from None
        except TimeoutError:
            # A write to the client waited client_timeout: it is not reading.
            log.info("client %s did not read the response of %s %s for %gs: closed",
                     addr[0] if isinstance(addr, tuple) else "-", req.method, req.path,
                     self.client_timeout)
            raise StopIteration() from None
        finally:
            waiting.served(me)
            if counted and self.per_address is not None:
                self.per_address.leave(counted)
            with contextlib.suppress(OSError):
                if sock.gettimeout() != 0.0:  # 0.0: a tunnel owns the socket now
                    sock.settimeout(None)
            self._deadlines.response_done(me)

    def _forwarded_client(self, req: Any, addr: Any) -> str | None:
        """Behind a trusted proxy, cap concurrent requests per forwarded
        client address: the counted address, or None when not counted.
        Over the cap, _Refused ends the connection with a 429."""
        peer = addr[0] if isinstance(addr, tuple) else ""
        if self.per_address is None or not self.forwarding.is_trusted(peer):
            return None
        chain = ", ".join(value for name, value in req.headers if name == "X-FORWARDED-FOR")
        client = self.forwarding.client_from_chain(chain, peer)
        if self.per_address.enter(client):
            return client
        log.warning("client %s (via %s) already has %d requests under way "
                    "(max_connections_per_ip): 429", client, peer, self.per_address.limit)
        raise _Refused(client)

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, _Refused):
            refuse(client, "429 Too Many Requests", "too many requests from your address under way", 1)
            linger(client)
            return
        if isinstance(exc, HeadTimeout):
            peer = addr[0] if isinstance(addr, tuple) else "-"
            if not handshake_done(client):
                # No TLS yet to carry a 408: just close.
                log.debug("client %s did not complete its TLS handshake within %gs: closed", peer,
                          self.header_timeout)
            elif exc.first:
                log.info("client %s sent no complete request head within %gs: 408 and closed",
                         peer, self.header_timeout)
                refuse(client, "408 Request Timeout", "request head not received in time")
            else:
                log.debug("keep-alive connection from %s idle for %gs: closed", peer, self.keepalive_timeout)
            return
        super().handle_error(req, client, addr, exc)
        if isinstance(exc, (LimitRequestHeaders, LimitRequestLine)):
            # The rest of an oversized head is likely still coming: closing
            # over it would reset the connection, and the client, still
            # sending, would never read the answer.
            linger(client)

    def _hub_error(self, context: Any, type_: type[BaseException] | None, value: BaseException | None,
                   tb: TracebackType | None) -> None:
        if (isinstance(context, BaseServer) and isinstance(value, OSError)
                and value.errno in (errno.EMFILE, errno.ENFILE)):
            # gevent stops accepting and retries with back-off; say so, at most once a second.
            now = time.monotonic()
            if now - self._out_of_fds_logged >= 1.0:
                self._out_of_fds_logged = now
                log.error("out of file descriptors (%s): not accepting new connections for a moment",
                          errno.errorcode.get(value.errno, value.errno))
            return
        self._hub_handle_error(context, type_, value, tb)


class _Refused(Exception):
    """A request over max_connections_per_ip, to be answered 429."""
