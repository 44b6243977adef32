"""rproxy's own errors of a forwarded exchange, and the one place where
foreign exceptions (socket, ssl, urllib3, http.client, gunicorn's body
readers) become them.

Each error carries what the client and the logs see: its status, the short
body text, the note for the access line (rproxy.error) and the log line.
The forwarder catches an error once, translates it here, and answers from
its attributes: no type tests of foreign exceptions elsewhere.

ClientError: the client's request body failed (it left, stalled, was
malformed or too large); the client connection is closed after the answer.
UpstreamError: the upstream failed before the first body byte reached the
client (502, 504; 503 when the server's pool is full). Its flags say whether
the request may go to another server, or once more on a fresh connection.
"""

from __future__ import annotations

import http.client

from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, NewConnectionError, ProtocolError, SSLError

from rproxy.messages import BadRequest
from rproxy.server.cuts import CLIENT_STREAM_ENDED
from rproxy.upstreams import client_tls


class ProxyError(Exception):
    """An exchange that ends in an error response: `status` and `body` for
    the client, `note` for the access line, `detail` for the log."""

    status = 502
    body = ""
    note = ""

    def __init__(self, detail: str = ""):
        super().__init__(detail)
        self.detail = detail


class ClientError(ProxyError):
    """The client's request body failed; its connection closes after the answer."""

    # The log line's format, with the client's address, the detail and the
    # request id; None: not logged.
    log_format: str | None = None


class ClientGone(ClientError):
    """The client stopped sending its request body before the end."""

    status, body, note = 499, "client closed the request", "client went away mid-upload"
    log_format = "client %s went away mid-upload (%s), request_id=%s"


class ClientTimeout(ClientGone):
    """The client sent no body bytes for client_timeout, or too slowly."""

    status, body, note = 408, "request body not received in time", "client stalled mid-upload"
    log_format = "client %s stalled mid-upload (%s): 408, request_id=%s"


class MalformedBody(ClientError):
    """The client's chunked body does not parse."""

    status, body, note = 400, "malformed chunked body", "malformed chunked body"
    log_format = "malformed chunked body from %s (%s), request_id=%s"


class BodyTooLarge(ClientError):
    """The body grew past max_body_size."""

    status, body = 413, "request body is too large"


def client_body_error(error: Exception, sent: int) -> ClientError:
    """The ClientError for an exception of the client's body stream, after
    `sent` bytes of it."""
    if isinstance(error, CLIENT_STREAM_ENDED):
        return ClientGone(f"{type(error).__name__}: {error}")
    if isinstance(error, TimeoutError):
        return ClientTimeout(f"no body bytes within client_timeout, after {sent} bytes")
    if isinstance(error, BadRequest):  # the worker's judgement of a chunk size line
        return BodyTooLarge(str(error)) if error.status == 413 else MalformedBody(str(error))
    # gunicorn's InvalidChunkSize, ChunkMissingTerminator, ...
    return MalformedBody(f"{type(error).__name__}: {error}")


class UpstreamError(ProxyError):
    """The upstream failed before the client got any of its response. The
    body, the note and the log line are one message; `reason` is the
    original error's text, for the server's health record."""

    # Nothing reached the upstream: any request may go to another server.
    nothing_sent = False
    # Sent, but no response head came: only a request safe to send twice may.
    no_answer = False
    # Counts against the server's health.
    recorded = True

    def __init__(self, status: int, message: str, reason: str, *, stale: bool = False):
        super().__init__(message)
        self.status, self.body, self.note = status, message, message
        self.reason = reason
        # On a reused keep-alive connection: the upstream closed it while
        # idle (or left stray bytes on it), so a fresh one is worth a try.
        self.stale = stale


class PoolFull(UpstreamError):
    nothing_sent, recorded = True, False


class NotConnected(UpstreamError):
    nothing_sent = True


class NoAnswer(UpstreamError):
    no_answer = True


# What reading an upstream's response raises (exchange.py, the socket, TLS):
# the errors an exchange expects, as against a bug.
EXCHANGE_FAILURES = (OSError, http.client.HTTPException)


class BodyTimeout(TimeoutError):
    """The upstream sent its response head, then no body byte in read_timeout."""


_STALE = (http.client.BadStatusLine, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def upstream_error(error: Exception, connect_timeout: float, read_timeout: float) -> UpstreamError:
    """The UpstreamError for whatever stopped an exchange with an upstream."""
    if isinstance(error, UpstreamError):
        return error
    kind, status, message = _classify(error, connect_timeout, read_timeout)
    if kind is UpstreamError and isinstance(error, OSError):
        kind = NoAnswer
    return kind(status, message, describe(error), stale=isinstance(error, _STALE))


def _classify(error: Exception, connect_timeout: float, read_timeout: float) -> tuple[type[UpstreamError], int, str]:
    if isinstance(error, EmptyPoolError):
        return PoolFull, 503, "upstream server is at max_connections"
    if isinstance(error, NewConnectionError):  # a ConnectTimeoutError too: tested first
        cause = error.__cause__
        if isinstance(cause, ConnectionRefusedError):
            return NotConnected, 502, "upstream refused the connection"
        return NotConnected, 502, f"cannot connect to upstream: {describe(cause or error)}"
    if isinstance(error, ConnectTimeoutError):
        return NotConnected, 504, f"upstream did not accept the connection within {connect_timeout:g}s"
    if isinstance(error, BodyTimeout):
        return UpstreamError, 504, f"upstream sent its response head, then no body within {read_timeout:g}s"
    if isinstance(error, TimeoutError):  # socket.timeout is TimeoutError
        return UpstreamError, 504, f"upstream sent no response within {read_timeout:g}s"
    bad_certificate = client_tls.verification_failure(error)
    if bad_certificate is not None:
        return UpstreamError, 502, ("TLS verification of the upstream failed: "
                                    f"{bad_certificate.verify_message or bad_certificate}")
    tls_error = client_tls.tls_failure(error)
    if tls_error is not None:
        return UpstreamError, 502, f"TLS with the upstream failed: {tls_error.reason or tls_error}"
    if isinstance(error, (SSLError, ProtocolError)) and isinstance(error.__cause__, OSError):
        error = error.__cause__
    if isinstance(error, http.client.RemoteDisconnected):
        return UpstreamError, 502, "upstream closed the connection without a response"
    if isinstance(error, http.client.IncompleteRead):
        return UpstreamError, 502, f"upstream closed the connection before the end of the response ({error!r})"
    if isinstance(error, (http.client.HTTPException, ProtocolError)):
        return UpstreamError, 502, f"malformed response from upstream: {describe(error)}"
    if isinstance(error, OSError):
        return UpstreamError, 502, f"connection to upstream failed: {describe(error)}"
    return UpstreamError, 502, f"upstream error: {describe(error)}"


def describe(error: BaseException) -> str:
    """An error's text for a log line, bounded."""
    text = str(error) or type(error).__name__
    return text if len(text) < 200 else text[:197] + "..."
