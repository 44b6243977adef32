"""A client connection handed over to the core after an Upgrade.

A tunnel (forwarding/tunnel.py) or the live status feed takes the client's
socket for itself once it has answered 101. It gets the socket and the bytes
the client sent right behind its request head (gunicorn may have read them
into its buffers already), and answers with a response whose body is
TAKEN_OVER: the worker then ends gunicorn's handling of the connection
without writing anything or closing it under the new owner
(worker.Worker.is_already_handled).
"""

from __future__ import annotations

import socket
from typing import Any, Iterator


class _TakenOver:
    """An empty body, recognised by identity: nothing is written for it."""

    __slots__ = ()

    def __iter__(self) -> Iterator[bytes]:
        return iter(())


# The body of a response whose connection the core has taken over.
TAKEN_OVER = _TakenOver()


def client_socket(environ: dict[str, Any]) -> socket.socket | None:
    """The client's connection, when it can be taken over: HTTP/1.x only
    (an HTTP/2 connection carries other streams)."""
    if environ.get("SERVER_PROTOCOL", "").startswith("HTTP/2"):
        return None
    sock: socket.socket | None = environ.get("gunicorn.socket")
    return sock


def buffered_client_bytes(environ: dict[str, Any]) -> bytes:
    """Bytes the client sent right behind its request head, already read
    into gunicorn's buffers behind wsgi.input: its body reader's unreader
    and the body's own buffer."""
    body = environ.get("wsgi.input")
    unreader = getattr(getattr(body, "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    data = take() if take else b""
    pending = getattr(body, "buf", None)
    if pending is not None and pending.tell():
        data = pending.getvalue() + data
    return data
