"""The last handler of every route: send the request to an upstream server
and stream its answer back.

One pooled urllib3 connection carries one exchange. The request body streams
upstream as the client sends it; the response body streams back as the
upstream sends it (an event stream reaches the client event by event; both
bodies are in bodies.py). Every
path out of here leaves the connection either back in its pool, ready for the
next request, or closed: a connection with a half-read response or a
half-sent request never goes back.

Failures before the first body byte map to 502 (refused, reset, malformed,
closed after the head) or 504 (connect or read timeout), as errors.py
translates them: the head goes to the client only with that byte. After it, a failure cuts the client connection,
so the client sees a truncated response, never a complete-looking one. A request that failed on a reused keep-alive connection which the
upstream had closed meanwhile is sent once more on a fresh connection, when
the upstream cannot have processed it (RFC 9110 9.2.2).

A request whose client left (an HTTP/2 stream reset, its connection lost)
stops waiting on its upstream at once (see client_left.py), and its connection
is discarded: a client that resets its streams holds no upstream connection
for longer than it takes to say so.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from urllib3.connection import HTTPConnection
from urllib3.exceptions import EmptyPoolError

from rproxy.config.sections import RouteConfig, ServerConfig
from rproxy.forwarding import early_hints
from rproxy.forwarding.bodies import CHUNK, Lease, Release, RequestBody, UpstreamBody
from rproxy.forwarding.errors import (
    EXCHANGE_FAILURES,
    BodyTooLarge,
    ClientError,
    UpstreamError,
    upstream_error,
)
from rproxy.forwarding.exchange import UpstreamResponse, request_head
from rproxy.forwarding.tunnel import Tunnels, open_tunnel
from rproxy.messages import (
    Request,
    Response,
    bad_header_value,
    clean_response_headers,
    error_response,
    valid_header_name,
)
from rproxy.server.client_left import ClientLeft, waiting
from rproxy.server.sockets import send_all
from rproxy.target import without_prefix
from rproxy.upstreams.servers import Server, Upstream

log = logging.getLogger("rproxy.forward")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def _retriable(error: UpstreamError, request: Request, request_body: RequestBody | None) -> bool:
    """May the request go to another server after this error?"""
    if error.nothing_sent:
        return request_body is None or request_body.replayable
    # Sent, but no response head came: only what is safe to send twice.
    return error.no_answer and request.method in IDEMPOTENT and request_body is None


class Forwarder:
    """Forwards the requests of one route to its upstream."""

    def __init__(self, route: RouteConfig, upstream: Upstream, server: ServerConfig, tunnels: Tunnels):
        self.upstream = upstream
        self.max_body_size = server.max_body_size
        self.body_chunk_deadline = (server.client_timeout + CHUNK / server.min_body_rate
                                    if server.min_body_rate else None)
        self.connect_timeout = route.connect_timeout or upstream.config.connect_timeout
        self.read_timeout = route.read_timeout or upstream.config.read_timeout
        self.strip = route.path if route.strip_prefix and route.path != "/" else None
        self.host_header = route.host_header
        self.upgrades = frozenset(route.upgrade)
        self.allow_trace = route.allow_trace
        self.idle_timeout = route.idle_timeout
        self.tunnels = tunnels
        self.retries = upstream.config.retries
        self.retry_timeout = upstream.config.retry_timeout
        self.fail_status = upstream.config.fail_status

    def __call__(self, request: Request) -> Response:
        if request.method == "TRACE" and not self.allow_trace:
            request.record.error = "TRACE refused"
            response = error_response(request, 405, "TRACE is not allowed here")
            response.close_connection = request.has_body
            return response
        if request.upgrade is not None and request.upgrade.lower() in self.upgrades:
            server = self.upstream.pick(request)
            if server is None:
                return self._none_available(request)
            request.record.server = server.label
            request.record.upstream = self.upstream.name
            try:
                return open_tunnel(request, server, self, self._target(request), self._headers(request, server))
            finally:
                self.upstream.done_with(server)
        if self.max_body_size and (request.content_length or 0) > self.max_body_size:
            return self._client_error(request, BodyTooLarge())
        try:
            request_body = RequestBody(request, self.max_body_size, self.body_chunk_deadline) if request.has_body else None
        except ClientError as e:
            return self._client_error(request, e)
        target = self._target(request)
        request.record.upstream = self.upstream.name
        first_try = time.monotonic()
        tried: list[Server] = []
        while True:
            server = self.upstream.pick(request, exclude=tried)
            if server is None:
                return self._none_available(request)
            tried.append(server)
            request.record.server = server.label
            try:
                outcome = self._attempt(server, request, target, request_body)
            finally:
                self.upstream.done_with(server)
            if isinstance(outcome, Response):
                return outcome
            if outcome.recorded:
                self.upstream.failed(server, outcome.reason)
            if (len(tried) <= self.retries and time.monotonic() - first_try < self.retry_timeout
                    and _retriable(outcome, request, request_body)
                    and self.upstream.any_available(exclude=tried)):
                log.info("upstream %s: %s failed (%s); trying another server, request_id=%s",
                         self.upstream.name, server.label, outcome.reason, request.request_id)
                continue
            return self.failure(request, server, outcome, record=False)

    def _attempt(self, server: Server, request: Request, target: str,
                 request_body: RequestBody | None) -> Response | UpstreamError:
        """One server's go at the request: a Response, or the error that stopped it."""
        headers = self._headers(request, server)
        try:
            me = waiting.begins()
        except ClientLeft:
            return self._client_left(request)
        try:
            try:
                conn = server.pool._get_conn(timeout=self.connect_timeout)
            except EmptyPoolError as e:
                return self._upstream_error(e)
            server.begin()
            release = Lease(server, conn)
            try:
                return self._exchange_on(server, conn, release, request, target, headers, request_body)
            except BaseException:  # ClientLeft, or the worker is going: never back to the pool
                release(reusable=False)
                raise
        except ClientLeft:
            return self._client_left(request)
        finally:
            waiting.discard(me)

    def _exchange_on(self, server: Server, conn: HTTPConnection, release: Release, request: Request, target: str,
                     headers: dict[str, str], request_body: RequestBody | None) -> Response | UpstreamError:
        """The exchange on a connection taken from the server's pool: a
        Response (its body releases the connection), or the error that
        stopped it (the connection released already)."""
        for attempt in (1, 2):
            reused = conn.sock is not None
            started = time.monotonic()
            try:
                response = self._exchange(conn, request.method, target, headers, request_body,
                                          request.chunked, request.header_case, request.environ)
            except ClientError as e:
                release(reusable=False)  # the upstream got a cut request: never a whole one
                return self._client_error(request, e)
            except Exception as e:  # anything else is the upstream's doing
                conn.close()
                error = self._upstream_error(e)
                if (attempt == 1 and reused and error.stale
                        and (request_body is None or request_body.replayable)
                        and (request.method in IDEMPOTENT or request_body is None)):
                    # The closed connection reconnects on the next attempt.
                    log.debug("stale keep-alive connection to %s (%s); sending again on a new one",
                              server.label, error.reason)
                    continue
                release(reusable=False)
                return error
            break
        request.record.upstream_ms = (time.monotonic() - started) * 1000
        try:
            proxied = self._relay(request, server.label, response, release)
        except EXCHANGE_FAILURES as e:
            return self._upstream_error(e)  # no body byte came: answered like a failure before the head
        if response.status in self.fail_status:
            self.upstream.failed(server, f"status {response.status}")
        else:
            self.upstream.succeeded(server)
        if request.has_body and request_body is not None and not request_body.complete:
            # The upstream answered before reading the whole body; the rest
            # is still on the client connection, which cannot be reused.
            proxied.close_connection = True
        return proxied

    def proxied(self, request: Request, label: str, response: UpstreamResponse, release: Release) -> Response:
        """The client's Response for an upstream's response head; its body
        streams from the upstream. An upstream that fails before the first
        body byte gets the client a 502 or 504 (see UpstreamBody.start)."""
        try:
            return self._relay(request, label, response, release)
        except EXCHANGE_FAILURES as e:
            return self._error_answer(request, label, self._upstream_error(e))

    @staticmethod
    def _relay(request: Request, label: str, response: UpstreamResponse, release: Release) -> Response:
        headers = response_headers(response.headers.items(), response.headers.get("Connection"),
                                   response.chunked)
        response.head_taken()
        body = UpstreamBody(response, request, label, release)
        body.start()
        return Response(response.status, headers, body, response.reason or None)

    def _exchange(self, conn: HTTPConnection, method: str, target: str, headers: dict[str, str],
                  body: RequestBody | None, chunked: bool, spelled: dict[str, str] | None = None,
                  environ: dict[str, Any] | None = None) -> UpstreamResponse:
        """Send the request on urllib3's pooled connection and read the
        response head (see exchange.py); a 103 goes on to the client of
        `environ` (early_hints.py)."""
        sock = conn.sock
        if sock is None:
            conn.timeout = self.connect_timeout
            conn.connect()
            sock = conn.sock
        if sock.gettimeout() != self.read_timeout:
            sock.settimeout(self.read_timeout)
        head = request_head(method, target, headers, chunked, spelled=spelled)
        if body is None:
            send_all(sock, head)
        else:
            try:
                payload = body.payload()
                if isinstance(payload, bytes):
                    send_all(sock, head + payload)
                else:
                    sock.sendall(head)
                    for chunk in payload:
                        sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    sock.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                # The upstream may have answered early and stopped reading
                # (e.g. 413 or 401): its answer is still worth reading.
                if body.sent == 0:
                    raise
        interim = None if environ is None else lambda status, pairs: early_hints.relay(environ, status, pairs)
        return UpstreamResponse(sock, method, interim=interim)

    def _headers(self, request: Request, server: Server) -> dict[str, str]:
        headers = dict(request.headers)
        if self.host_header != "client":
            headers["Host"] = server.label if self.host_header == "upstream" else self.host_header
        if "Host" not in headers:
            headers["Host"] = server.label
        # The parsers in front refuse such bytes; this makes a header that
        # could split the upstream request impossible whatever changed it since.
        if bad_header_value("\t".join(headers.values())) or not valid_header_name("".join(headers)):
            for name, value in list(headers.items()):
                if bad_header_value(value) or not valid_header_name(name):
                    log.warning("dropped request header %r: not a valid header, request_id=%s",
                                name[:64], request.request_id)
                    del headers[name]
        return headers

    def _target(self, request: Request) -> str:
        if self.strip is None:
            return request.target
        return without_prefix(request.target, request.path, request.query, self.strip)

    @staticmethod
    def _closing(response: Response) -> Response:
        response.close_connection = True
        return response

    def _client_error(self, request: Request, error: ClientError) -> Response:
        if error.log_format is not None:
            log.info(error.log_format, request.client_ip, error.detail, request.request_id)
        if error.note:
            request.record.error = error.note
        return self._closing(error_response(request, error.status, error.body))

    @staticmethod
    def _client_left(request: Request) -> Response:
        # Not logged but in the access line: a rapid reset flood would
        # write a line per stream.
        request.record.error = "client left before the response"
        return error_response(request, 499, "client closed the request")

    def _none_available(self, request: Request) -> Response:
        request.record.error = "no server available"
        return error_response(request, 503, f"no server of upstream {self.upstream.name} is available",
                              [("Retry-After", str(self.upstream.unavailable()))])

    def failure(self, request: Request, server: Server, error: Exception, record: bool = True) -> Response:
        """The client's answer to an upstream error (recorded against the
        server's health unless already done)."""
        error = self._upstream_error(error)
        if record and error.recorded:
            self.upstream.failed(server, error.reason)
        return self._error_answer(request, server.label, error)

    def _upstream_error(self, error: Exception) -> UpstreamError:
        return upstream_error(error, self.connect_timeout, self.read_timeout)

    @staticmethod
    def _error_answer(request: Request, label: str, error: UpstreamError) -> Response:
        request.record.error = error.note
        log.warning("upstream %s (%s %s): %s, request_id=%s", label, request.method,
                    request.target, error.detail, request.request_id)
        response = error_response(request, error.status, error.body,
                                  [("Retry-After", "1")] if error.status == 503 else ())
        if request.has_body:
            response.close_connection = True
        return response


def response_headers(pairs: Iterable[tuple[str, str]], connection: str | None,
                     chunked: bool) -> list[tuple[str, str]]:
    dropped: list[str] = []
    out = clean_response_headers(pairs, connection, chunked, dropped)
    for name in dropped:
        log.warning("dropped a malformed response header %r from upstream", name[:64])
    return out
