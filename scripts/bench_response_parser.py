"""Micro-benchmark: exchange.py's response reader against httptools (llhttp)
on upstream response heads and body framing, all bytes already received
(the parsers' own cost, no socket). Prints CPU µs per response (process
time: steadier than wall time on a machine shared with other work).

    .venv/bin/python scripts/bench_response_parser.py   (needs httptools installed)
"""

from __future__ import annotations

import time
import timeit

import httptools

from rproxy.forwarding.exchange import UnsupportedCoding, UpstreamResponse


class Drained:
    """A socket whose bytes were all read already."""

    def recv(self, n: int) -> bytes:
        return b""


def head(fields: int, framing: bytes) -> bytes:
    lines = [b"HTTP/1.1 200 OK", b"Date: Mon, 30 Nov 2026 18:00:00 GMT", b"Content-Type: text/html; charset=utf-8",
             framing, b"Server: upstream/1.0", b"Cache-Control: max-age=60"]
    lines += [b"X-Extra-%d: value-%d-abcdefghijklmnop" % (i, i) for i in range(fields - 5)]
    return b"\r\n".join(lines[:fields + 1]) + b"\r\n\r\n"


BODY = b"x" * 512
CASES = {
    "5 fields, Content-Length": head(5, b"Content-Length: 512") + BODY,
    "15 fields, Content-Length": head(15, b"Content-Length: 512") + BODY,
    "5 fields, chunked (2 chunks)": head(5, b"Transfer-Encoding: chunked") + b"100\r\n" + BODY[:256] + b"\r\n100\r\n"
    + BODY[256:] + b"\r\n0\r\n\r\n",
    "15 fields, chunked (2 chunks)": head(15, b"Transfer-Encoding: chunked") + b"100\r\n" + BODY[:256] + b"\r\n100\r\n"
    + BODY[256:] + b"\r\n0\r\n\r\n",
}
GZIP_CHUNKED = head(5, b"Transfer-Encoding: gzip, chunked") + b"4\r\nabcd\r\n0\r\n\r\n"


def exchange(raw: bytes) -> int:
    response = UpstreamResponse(Drained(), "GET", buffered=raw)
    size = 0
    while not response.complete:
        size += len(response.read1(65536))
    return size


class Collect:
    """The callbacks a proxy needs: status, header pairs, body pieces, the end."""

    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def llhttp(raw: bytes) -> int:
    sink = Collect()
    parser = httptools.HttpResponseParser(sink)
    parser.feed_data(raw)
    parser.get_status_code()
    assert sink.done
    return sum(map(len, sink.body))


def main() -> None:
    number = 20000
    print(f"{'case':32} {'exchange.py':>12} {'httptools':>10}   (CPU µs per response, best of 5 x {number})")
    for name, raw in CASES.items():
        assert exchange(raw) == llhttp(raw) == 512
        ours = min(timeit.repeat(lambda: exchange(raw), number=number, repeat=5, timer=time.process_time)) / number * 1e6
        theirs = min(timeit.repeat(lambda: llhttp(raw), number=number, repeat=5, timer=time.process_time)) / number * 1e6
        print(f"{name:32} {ours:12.2f} {theirs:10.2f}")
    try:
        exchange(GZIP_CHUNKED)
        ours = "passed on"
    except UnsupportedCoding:
        ours = "refused (502)"
    sink = Collect()
    httptools.HttpResponseParser(sink).feed_data(GZIP_CHUNKED)
    print(f"Transfer-Encoding: gzip, chunked: exchange.py {ours}; httptools frames it as chunked "
          f"(body {b''.join(sink.body)!r}, complete={sink.done}) and leaves the gzip coding to the caller")


if __name__ == "__main__":
    main()
