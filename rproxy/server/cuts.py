"""gunicorn's side of a request's errors, for the core: which exceptions of
its body readers mean the client's stream ended, and the exceptions that cut
a client's response short the way the worker expects (a connection reset
over HTTP/1.1, a quiet RST_STREAM of just that stream over HTTP/2)."""

from __future__ import annotations

import errno
from typing import Any

from gunicorn.http.errors import NoMoreData
from gunicorn.http2.errors import HTTP2StreamError

# Raised by wsgi.input when the client's connection ended mid-body, or its
# HTTP/2 stream was reset or its connection lost.
CLIENT_STREAM_ENDED = (NoMoreData, HTTP2StreamError)


class ConnectionCut(ConnectionResetError):
    """Raised to the WSGI server as a connection reset, so that it drops the
    client connection without a traceback."""

    def __init__(self, message: str):
        super().__init__(errno.ECONNRESET, message)


class StreamCut(HTTP2StreamError):
    """ConnectionCut over HTTP/2: the worker resets just this stream,
    quietly; the connection's other streams go on."""

    message: str  # set by HTTP2StreamError

    def __init__(self, message: str):
        super().__init__(0, message)

    def __str__(self) -> str:
        return self.message


def cut_client(environ: dict[str, Any], message: str) -> Exception:
    """The exception that cuts this client's response short."""
    if environ.get("SERVER_PROTOCOL", "").startswith("HTTP/2"):
        return StreamCut(message)
    return ConnectionCut(message)
