"""What the client and the logs get for each failure of an exchange
(rproxy/forwarding/errors.py): foreign exceptions in, rproxy's errors out,
without processes. The end-to-end answers are pinned by test_upstream_errors.py,
test_faults.py and test_upstream_framing.py."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time

import pytest
from gunicorn.http.errors import InvalidChunkSize, NoMoreData
from urllib3.exceptions import ConnectTimeoutError, EmptyPoolError, NewConnectionError, ProtocolError

from rproxy.forwarding.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientGone,
    ClientTimeout,
    MalformedBody,
    client_body_error,
    upstream_error,
)
from rproxy.forwarding.exchange import MAX_HEAD, read_head
from rproxy.messages import BadRequest


def refused() -> NewConnectionError:
    error = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] refused")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


def protocol_error() -> ProtocolError:
    """urllib3's wrapping of a socket error, as it raises it."""
    cause = ConnectionResetError(104, "reset")
    try:
        raise ProtocolError("Connection aborted.", cause) from cause
    except ProtocolError as error:
        return error


def plain_http_answer_to_tls() -> ssl.SSLError:
    """The error of a TLS handshake answered in plain HTTP."""
    ours, theirs = socket.socketpair()
    theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    theirs.shutdown(socket.SHUT_WR)  # still reading: the ClientHello is sent whole
    ours.settimeout(5)
    try:
        ssl.create_default_context().wrap_socket(ours, server_hostname="upstream.test")
    except ssl.SSLError as error:
        return error
    finally:
        ours.close()
        theirs.close()
    raise AssertionError("the handshake succeeded")


@pytest.mark.parametrize("error, status, message", [
    (EmptyPoolError(None, "full"), 503, "upstream server is at max_connections"),
    (refused(), 502, "upstream refused the connection"),
    (ConnectTimeoutError("slow"), 504, "upstream did not accept the connection within 1.5s"),
    (socket.timeout("timed out"), 504, "upstream sent no response within 7s"),
    (BodyTimeout(), 504, "upstream sent its response head, then no body within 7s"),
    (http.client.RemoteDisconnected("gone"), 502, "upstream closed the connection without a response"),
    (http.client.BadStatusLine("SPDY"), 502, "malformed response from upstream: SPDY"),
    (ConnectionResetError(104, "Connection reset by peer"), 502,
     "connection to upstream failed: [Errno 104] Connection reset by peer"),
    (protocol_error(), 502, "connection to upstream failed: [Errno 104] reset"),
    (plain_http_answer_to_tls(), 502, "TLS with the upstream failed: "),
    (ValueError("odd"), 502, "upstream error: odd"),
])
def test_each_upstream_failure_has_its_status_and_message(error, status, message):
    translated = upstream_error(error, connect_timeout=1.5, read_timeout=7)
    assert translated.status == status
    assert translated.body.startswith(message) and translated.note == translated.body == translated.detail


def test_what_may_go_to_another_server():
    nothing_sent = [EmptyPoolError(None, "full"), refused(), ConnectTimeoutError("slow")]
    no_answer = [socket.timeout("timed out"), http.client.RemoteDisconnected("gone"), ConnectionResetError()]
    neither = [http.client.BadStatusLine("SPDY"), http.client.IncompleteRead(b"x"), ValueError("odd")]
    for error in nothing_sent:
        assert upstream_error(error, 1, 1).nothing_sent
    for error in no_answer:
        translated = upstream_error(error, 1, 1)
        assert translated.no_answer and not translated.nothing_sent
    for error in neither:
        translated = upstream_error(error, 1, 1)
        assert not translated.no_answer and not translated.nothing_sent


def test_a_full_pool_does_not_count_against_the_server():
    assert not upstream_error(EmptyPoolError(None, "full"), 1, 1).recorded
    assert upstream_error(refused(), 1, 1).recorded


def test_a_closed_keep_alive_connection_is_stale_and_a_timeout_is_not():
    for error in (http.client.RemoteDisconnected("gone"), http.client.BadStatusLine("x"),
                  ConnectionResetError(), BrokenPipeError(), ConnectionAbortedError()):
        assert upstream_error(error, 1, 1).stale
    for error in (socket.timeout("timed out"), http.client.IncompleteRead(b"x"), refused()):
        assert not upstream_error(error, 1, 1).stale


def test_translating_twice_changes_nothing():
    once = upstream_error(socket.timeout("timed out"), 1, 1)
    assert upstream_error(once, 2, 2) is once


def test_long_reasons_are_cut_for_the_log():
    translated = upstream_error(ValueError("x" * 500), 1, 1)
    assert len(translated.reason) == 200 and translated.reason.endswith("...")


@pytest.mark.parametrize("error, kind, status, body", [
    (NoMoreData(b""), ClientGone, 499, "client closed the request"),
    (TimeoutError(), ClientTimeout, 408, "request body not received in time"),
    (BadRequest("chunk too large", 413), BodyTooLarge, 413, "request body is too large"),
    (BadRequest("bad size"), MalformedBody, 400, "malformed chunked body"),
    (InvalidChunkSize(b"zz"), MalformedBody, 400, "malformed chunked body"),
])
def test_each_client_body_failure_has_its_status_and_body(error, kind, status, body):
    translated = client_body_error(error, sent=10)
    assert type(translated) is kind and translated.status == status and translated.body == body


def upstream_sending(*pieces: bytes, pause: float = 0.02) -> socket.socket:
    """Our end of a socket pair whose other end sends `pieces` one by one,
    then closes."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)

    def send():
        with theirs:
            for piece in pieces:
                theirs.sendall(piece)
                time.sleep(pause)

    threading.Thread(target=send, daemon=True).start()
    return ours


def test_a_head_sent_in_pieces_is_read_whole_with_what_follows():
    sock = upstream_sending(b"HTTP/1.1 101 Switching\r\nUpgr", b"ade: websocket\r\n\r", b"\nframe")
    with sock:
        head, rest = read_head(sock)
    assert head == b"HTTP/1.1 101 Switching\r\nUpgrade: websocket"
    assert rest.startswith(b"frame")


def test_head_reader_limits_and_cuts():
    with upstream_sending(b"X" * (MAX_HEAD + 1), pause=0) as sock, pytest.raises(http.client.LineTooLong):
        read_head(sock)
    with upstream_sending() as sock, pytest.raises(http.client.RemoteDisconnected):
        read_head(sock)
    with upstream_sending(b"HTTP/1.1 200 OK\r\n") as sock, pytest.raises(http.client.IncompleteRead):
        read_head(sock)
