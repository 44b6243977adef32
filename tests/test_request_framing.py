"""A chunked request body's framing is judged as each chunk-size line is
read, before any byte of the body goes upstream: a size past max_body_size
gets 413 at once, an absurd or malformed one 400, and the upstream (a
scripted one that records every byte) receives nothing, not even a
connection."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import single_route
from scripted_upstream import ScriptedUpstream

HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Each is sent alone, the head and this much of the body: the answer must
# come without the client sending another byte. With what nginx does, from
# its chunked parser (ngx_http_parse_chunked) and request body filter.
REFUSED = {
    "a chunk size over max_body_size (2 MiB)": (b"200000\r\n", 413, "413 at the size line"),
    "sizes adding up past max_body_size": (b"5\r\nhello\r\nfffff\r\n", 413, "413 at the size line"),
    "a chunk size of 2^84": (b"1" + b"0" * 21 + b"\r\n", 400, "400, past 2^63"),
    "a 100-digit chunk size": (b"f" * 100 + b"\r\n", 400, "400, past 2^63"),
    "100000 leading zeros (a size line past max_header_size)": (b"0" * 100_000 + b"5\r\n", 400,
                                                                "accepted: zeros are read as they come"),
    "a negative chunk size": (b"-5\r\n", 400, "400"),
    "a 0x chunk size": (b"0x5\r\n", 400, "400"),
    "a + chunk size": (b"+5\r\n", 400, "400"),
    "a control byte in a chunk extension": (b"5;a\x01b\r\n", 400, "accepted: extensions are skipped"),
    "a chunk extension without a name": (b"5;\r\n", 400, "accepted: extensions are skipped"),
    "a bare LF after the size": (b"5\nhello\r\n", 400, "400"),
}


@pytest.fixture
def recording_upstream():
    upstream = ScriptedUpstream(OK)
    yield upstream
    upstream.stop()


def answer_to(port: int, data: bytes) -> tuple[bytes, float]:
    """Send `data` and nothing more; the answer's head and body as soon as
    they are in (not waiting for the close), and how long that took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        started = time.monotonic()
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply, time.monotonic() - started


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_chunk_sizes_are_refused_when_the_size_line_is_read(start_proxy, recording_upstream, case,
                                                                hardening_record):
    body, status, nginx = REFUSED[case]
    proxy = start_proxy(single_route(recording_upstream.port), server={"max_body_size": "1m"})
    reply, took = answer_to(proxy.port, HEAD + body)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:300]
    assert took < 5  # not waiting for more of the body, nor for client_timeout
    time.sleep(0.2)
    assert recording_upstream.received == []  # not even a connection
    hardening_record((f"request chunk size: {case} (max_body_size 1m)", "1",
                      f"{status} at once, the upstream received nothing (nginx: {nginx})"))


def test_absurd_chunk_size_is_400_also_without_a_body_limit(start_proxy, recording_upstream):
    proxy = start_proxy(single_route(recording_upstream.port), server={"max_body_size": "0"})
    reply, _ = answer_to(proxy.port, HEAD + b"1" + b"0" * 21 + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"malformed chunked body" in reply
    assert recording_upstream.received == []


def test_leading_zeros_and_extensions_are_a_valid_chunked_body(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_body_size": "1m"})
    reply, _ = answer_to(proxy.port, HEAD.replace(b"/up", b"/echo")
                         + b"0" * 100 + b"5;name=value;q=\"a b\"\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    echo = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert echo["body_length"] == 5 and ["Transfer-Encoding", "chunked"] in echo["headers"]


def test_chunked_body_declaring_exactly_max_body_size_is_forwarded(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_body_size": "1k"})
    head = HEAD.replace(b"/up", b"/echo")
    reply, _ = answer_to(proxy.port, head + b"200\r\n" + b"a" * 512 + b"\r\n200\r\n" + b"b" * 512
                         + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["body_length"] == 1024
    reply, _ = answer_to(proxy.port, head + b"200\r\n" + b"a" * 512 + b"\r\n201\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
