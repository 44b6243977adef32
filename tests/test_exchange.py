"""The upstream response reader (rproxy/forwarding/exchange.py) on the framings and
malformed answers an upstream may send, over a real socket pair."""

from __future__ import annotations

import http.client
import socket

import pytest

from rproxy.forwarding.exchange import UnsupportedCoding, UpstreamResponse, request_head
from rproxy.forwarding.forwarder import response_headers


def answer(raw: bytes, method: str = "GET", close: bool = True, interim=None):
    ours, theirs = socket.socketpair()
    theirs.sendall(raw)
    if close:
        theirs.close()
    ours.settimeout(2)
    return UpstreamResponse(ours, method, interim=interim)


def body(response: UpstreamResponse, n: int = 7) -> bytes:
    out = b""
    while data := response.read1(n):
        out += data
    return out


def test_content_length_body_is_complete_and_reusable():
    response = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", close=False)
    assert (response.status, response.reason, response.headers.get("x-a")) == (200, "OK", "1")
    assert body(response) == b"hello"
    assert response.complete and response.reusable


def test_chunked_body_with_extensions_and_trailers():
    response = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n", close=False)
    assert response.chunked
    assert body(response, 4) == b"hello world"
    assert response.reusable


def test_a_taken_head_lets_its_headers_go_and_the_body_still_streams():
    # What a held stream keeps is the framing it reads with, not the head it answered with.
    chunked = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n", close=False)
    sized = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello", close=False)
    for response in (chunked, sized):
        response.head_taken()
        assert list(response.headers) == [] and response.headers.get("x-a") is None
        assert body(response, 2) == b"hello"
        assert response.complete and response.reusable


def test_interim_answers_are_skipped():
    response = answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                      b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    assert response.status == 201
    assert body(response) == b"ok"


def test_interim_answers_are_shown_to_the_caller_in_order():
    seen = []
    response = answer(b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                      interim=lambda status, headers: seen.append((status, list(headers))))
    assert seen == [(102, []), (103, [("Link", "</a>")])]
    assert response.status == 200 and body(response) == b"ok"


@pytest.mark.parametrize("status, method", [(204, "GET"), (304, "GET"), (200, "HEAD")])
def test_no_body_answers(status, method):
    response = answer(b"HTTP/1.1 %d X\r\nContent-Length: 50\r\n\r\n" % status, method, close=False)
    assert response.read1(10) == b"" and response.complete


def test_body_until_close_is_not_reusable():
    response = answer(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert body(response) == b"all of it"
    assert response.complete and not response.reusable


def test_http10_closes_unless_keep_alive():
    assert answer(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").will_close
    assert not answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n").will_close


def test_stray_bytes_after_the_body_make_the_connection_unusable():
    response = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", close=False)
    assert body(response, 100) == b"ok"
    assert not response.reusable


def test_folded_header_is_one_value():
    response = answer(b"HTTP/1.1 200 OK\r\nX-Long: a\r\n  b\r\nContent-Length: 0\r\n\r\n")
    assert response.headers.get("X-Long") == "a b"


@pytest.mark.parametrize("raw, error", [
    (b"", http.client.RemoteDisconnected),
    (b"HTTP/1.1 twohundred OK\r\n\r\n", http.client.BadStatusLine),
    (b"SPDY 200 OK\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nContent-Le", http.client.IncompleteRead),
])
def test_malformed_heads(raw, error):
    with pytest.raises(error):
        answer(raw)


def test_short_bodies_are_cuts():
    response = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    with pytest.raises(http.client.IncompleteRead):
        body(response)
    chunked = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nshort")
    with pytest.raises(http.client.IncompleteRead):
        body(chunked)
    for size in (b"zz", b"0x5", b"+5", b"-5", b"5_0", b""):
        bad_size = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%b\r\nhello\r\n0\r\n\r\n" % size)
        with pytest.raises(http.client.HTTPException):
            body(bad_size)


def test_request_head_is_one_buffer():
    head = request_head("POST", "/a?b", {"Host": "h", "X-Request-Id": "r"}, chunked=True)
    assert head == b"POST /a?b HTTP/1.1\r\nHost: h\r\nX-Request-Id: r\r\nTransfer-Encoding: chunked\r\n\r\n"


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize("lines", [
    [b"Chunked"], [b" chunked "], [b"CHUNKED"], [b"chunked,"], [b", chunked"],
])
def test_chunked_however_spelled_is_chunked(lines):
    head = b"".join(b"Transfer-Encoding:%b\r\n" % line for line in lines)
    response = answer(b"HTTP/1.1 200 OK\r\n%b\r\n%b" % (head, CHUNKED_HELLO), close=False)
    assert response.chunked and body(response) == b"hello" and response.reusable


@pytest.mark.parametrize("lines", [
    [b"gzip, chunked"], [b"chunked, gzip"], [b"gzip", b"chunked"], [b"chunked", b"gzip"],
    [b"chunked, chunked"], [b"chunked", b"chunked"], [b"xchunked"], [b"identity"], [b"deflate"],
    [b""], [b"chunked;q=1"], [b"compress, chunked"],
])
def test_transfer_codings_that_cannot_be_passed_on_are_refused(lines):
    head = b"".join(b"Transfer-Encoding: %b\r\n" % line for line in lines)
    with pytest.raises(UnsupportedCoding):
        answer(b"HTTP/1.1 200 OK\r\n%b\r\n%b" % (head, CHUNKED_HELLO))


def test_transfer_encoding_overrides_content_length_which_is_dropped():
    response = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + CHUNKED_HELLO, close=False)
    assert response.chunked and body(response) == b"hello" and response.reusable
    headers = response_headers(response.headers.items(), None, response.chunked)
    assert [name for name, _ in headers] == []  # neither length nor coding goes to the client


def test_transfer_encoding_in_an_http10_response_is_faulty_framing():
    with pytest.raises(UnsupportedCoding):
        answer(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO)


@pytest.mark.parametrize("status, method", [(204, "GET"), (304, "GET"), (200, "HEAD")])
def test_no_body_answers_ignore_their_transfer_coding(status, method):
    response = answer(b"HTTP/1.1 %d X\r\nTransfer-Encoding: gzip\r\n\r\n" % status, method, close=False)
    assert response.read1(10) == b"" and response.complete


def test_chunked_response_cut_before_its_first_chunk_is_incomplete():
    response = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(http.client.IncompleteRead):
        response.read1(10)


@pytest.mark.parametrize("size", [0, 100, 4 << 20])
def test_send_all_sends_everything_in_one_send_or_more(size):
    # server/sockets.py's send_all: one send when the buffer takes it all, sendall for the rest.
    import gevent
    import gevent.socket

    from rproxy.server.sockets import send_all
    ours, theirs = gevent.socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ours.settimeout(10)
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        reader = gevent.spawn(lambda: b"".join(iter(lambda: theirs.recv(65536), b"")))
        send_all(ours, data)
        ours.shutdown(socket.SHUT_WR)
        assert reader.get(timeout=10) == data
