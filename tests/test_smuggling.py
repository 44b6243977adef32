"""Ambiguous or malformed requests are refused (or normalised beyond doubt)
and never reach the upstream as something it would read differently."""

import pytest
import requests
from conftest import raw_exchange

REFUSED = {
    "both Content-Length and Transfer-Encoding":
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two Content-Lengths": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "malformed Content-Length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4x\r\n\r\nabcd",
    "unknown transfer coding": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "a coding before chunked": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                               b"0\r\n\r\n",
    "chunked over HTTP/1.0": b"POST /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bare LF line endings": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "NUL in a header": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "obsolete line folding": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "two Host headers": b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "malformed Host": b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n",
}

NORMALISED = {
    "chunked with a trailing space": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked \r\n\r\n"
                                     b"3\r\nabc\r\n0\r\n\r\n",
    "chunked in capitals": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
                           b"3\r\nabc\r\n0\r\n\r\n",
}


def upstream_requests(upstream) -> int:
    return upstream.stats()["requests"] - 1  # less the stats call itself


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_ambiguous_requests_are_refused_before_the_upstream(proxy, upstream, case, hardening_record):
    upstream.reset()
    data = raw_exchange(proxy.port, REFUSED[case])
    status = data.split(b" ", 2)[1]
    reached = upstream_requests(upstream)
    hardening_record((f"smuggling: {case}", "1",
                      f"{status.decode()}; upstream received {reached} requests"))
    assert status in (b"400", b"501"), data[:200]
    assert reached == 0


@pytest.mark.parametrize("case", sorted(NORMALISED))
def test_loose_but_unambiguous_framing_is_normalised(proxy, upstream, case, hardening_record):
    upstream.reset()
    data = raw_exchange(proxy.port, NORMALISED[case].replace(b"HTTP/1.1\r\nHost: x\r\n",
                                                         b"HTTP/1.1\r\nHost: x\r\nConnection: close\r\n", 1))
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    body = data.split(b"\r\n\r\n", 1)[1]
    hardening_record((f"smuggling: {case}", "1", "normalised: the upstream got one clean chunked body"))
    assert b'"body_length": 3' in body and b'["Transfer-Encoding", "chunked"]' in body


def test_malformed_chunk_size_is_400_and_no_whole_request_reaches_the_upstream(proxy, upstream, hardening_record):
    upstream.reset()
    data = raw_exchange(proxy.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"zz\r\nabc\r\n0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ") and b"malformed chunked body" in data
    assert b"smuggled" not in data
    hardening_record(("smuggling: bad chunk size, a request pipelined behind", "1", "400; nothing smuggled"))
    # Whatever the upstream saw, it was never a complete request.
    assert requests.get(upstream.url + "/_stats", timeout=5).json()["requests"] <= 2
