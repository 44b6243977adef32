"""What the client gets when an upstream frames its response badly: a head
and nothing after it, a truncated head, a body cut short, transfer codings
the proxy cannot pass on. Before the first body byte the client gets a 502
(or 504), since nothing has gone to it yet; after it, a cut connection
(over HTTP/2 a reset stream), never a complete-looking response."""

from __future__ import annotations

import time

import pytest
from conftest import raw_exchange, single_route
from h2client import RawH2
from scripted_upstream import ScriptedUpstream

GET = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
H2C = {"http2": "yes", "http2_cleartext": "yes"}

BEFORE_THE_BODY = {
    "head with Content-Length, then close": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "chunked head, then close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    "chunked head and half a size line, then close": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1",
    "truncated head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "status line only": b"HTTP/1.1 200 OK\r\n",
}

CODINGS = {
    "gzip, chunked": b"Transfer-Encoding: gzip, chunked\r\n",
    "chunked, gzip": b"Transfer-Encoding: chunked, gzip\r\n",
    "gzip and chunked on two lines": b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    "chunked on two lines": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "an unknown coding": b"Transfer-Encoding: xchunked\r\n",
    "chunked in an HTTP/1.0 response": b"Transfer-Encoding: chunked\r\n",
}

NGINX_CODINGS = "nginx: 502 for any Transfer-Encoding but one chunked line"


@pytest.fixture
def scripted():
    made: list[ScriptedUpstream] = []

    def make(answer: bytes, hold: bool = False) -> ScriptedUpstream:
        upstream = ScriptedUpstream(answer, hold)
        made.append(upstream)
        return upstream
    yield make
    for upstream in made:
        upstream.stop()


def dechunk(body: bytes) -> bytes:
    """A complete chunked body, decoded (AssertionError if it is not complete)."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            assert body == b"\r\n", body
            return out
        out, body = out + body[:size], body[size + 2:]


def status_and_body(reply: bytes) -> tuple[int, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("case", sorted(BEFORE_THE_BODY))
def test_upstream_failing_before_its_first_body_byte_gives_502(start_proxy, scripted, case,
                                                               hardening_record):
    upstream = scripted(BEFORE_THE_BODY[case])
    proxy = start_proxy(single_route(upstream.port), server=H2C)
    status, body = status_and_body(raw_exchange(proxy.port, GET))
    assert status == 502, body
    assert b"upstream closed the connection before the end of the response" in body
    proxy.wait_for_log(r"upstream 127\.0\.0\.1:\d+ \(GET /x\): upstream closed the connection before the end")
    # The same over HTTP/2.
    client = RawH2(proxy.port)
    try:
        answer = client.response(client.request("GET", "/x"))
    finally:
        client.close()
    assert answer["status"] == 502 and answer["ended"], answer
    hardening_record((f"upstream framing: {case}", "1 over HTTP/1.1, 1 over HTTP/2",
                      "502 with a short body, logged (nginx: the head goes to the client, "
                      "then the connection is cut)"))


def test_upstream_silent_after_its_head_gives_504(start_proxy, scripted):
    upstream = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", hold=True)
    proxy = start_proxy(single_route(upstream.port, upstream_extra="read_timeout = 500ms"))
    started = time.monotonic()
    status, body = status_and_body(raw_exchange(proxy.port, GET))
    assert status == 504 and b"upstream sent its response head, then no body within 0.5s" in body
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\nhello",
])
def test_upstream_closing_after_part_of_the_body_cuts_the_client(start_proxy, scripted, answer):
    upstream = scripted(answer)
    proxy = start_proxy(single_route(upstream.port), server=H2C)
    reply = raw_exchange(proxy.port, GET)
    status, body = status_and_body(reply)
    assert status == 200
    # Whatever the framing to the client, it is visibly incomplete: a length
    # not reached, or a chunked body without its last chunk.
    if b"Content-Length: 100" in reply:
        assert body == b"hello"
    else:
        assert b"Transfer-Encoding: chunked" in reply and body == b"5\r\nhello\r\n"
    proxy.wait_for_log(r"cut the response mid-body")
    client = RawH2(proxy.port)
    try:
        answer_h2 = client.response(client.request("GET", "/x"))
    finally:
        client.close()
    assert answer_h2["status"] == 200 and answer_h2["reset"] is not None and not answer_h2["ended"]
    assert answer_h2["body"] == b"hello"


@pytest.mark.parametrize("case", sorted(CODINGS))
def test_transfer_codings_the_proxy_cannot_pass_on_give_502(start_proxy, scripted, case, hardening_record):
    version = b"HTTP/1.0" if "HTTP/1.0" in case else b"HTTP/1.1"
    upstream = scripted(version + b" 200 OK\r\n" + CODINGS[case] + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    proxy = start_proxy(single_route(upstream.port), server=H2C)
    status, body = status_and_body(raw_exchange(proxy.port, GET))
    assert status == 502, body
    assert b"malformed response from upstream" in body and b"hello" not in body
    proxy.wait_for_log(r"malformed response from upstream: .*Transfer-Encoding|transfer coding")
    client = RawH2(proxy.port)
    try:
        answer = client.response(client.request("GET", "/x"))
    finally:
        client.close()
    assert answer["status"] == 502
    hardening_record((f"upstream framing: Transfer-Encoding {case}", "1 over HTTP/1.1, 1 over HTTP/2",
                      f"502, logged; no chunk framing reaches the client ({NGINX_CODINGS})"))


@pytest.mark.parametrize("head", [
    b"Transfer-Encoding: Chunked\r\n",
    b"Transfer-Encoding:  chunked \r\n",
    b"Transfer-Encoding: chunked,\r\n",
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 99\r\nContent-Length: 100\r\n",
])
def test_chunked_however_spelled_reaches_the_client_decoded(start_proxy, scripted, head, hardening_record):
    upstream = scripted(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    proxy = start_proxy(single_route(upstream.port), server=H2C)
    reply = raw_exchange(proxy.port, GET)
    status, body = status_and_body(reply)
    assert status == 200
    assert b"Content-Length" not in reply.partition(b"\r\n\r\n")[0]  # Transfer-Encoding won: the length is dropped
    assert b"Transfer-Encoding: chunked" in reply and dechunk(body) == b"hello world"  # framed afresh
    client = RawH2(proxy.port)
    try:
        answer = client.response(client.request("GET", "/x"))
    finally:
        client.close()
    assert answer["status"] == 200 and answer["ended"] and answer["body"] == b"hello world"
    assert not any(name == "content-length" for name, _ in answer["headers"])
    spelled = head.decode().strip().replace("\r\n", "; ")
    hardening_record((f"upstream framing: {spelled!r}", "1 over HTTP/1.1, 1 over HTTP/2",
                      "chunked: decoded and re-framed" + (", Content-Length dropped (nginx: 502)"
                                                          if "Content-Length" in spelled else "")))
