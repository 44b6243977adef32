"""The worker's request parsing, in-process: gunicorn's parser with
rproxy's judgement of chunk sizes and header counts (rproxy/server/request_parser.py).
The gunicorn internals that judgement hooks into are pinned in
test_canaries.py."""

from __future__ import annotations

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import InvalidChunkSize, LimitRequestHeaders
from gunicorn.http.unreader import IterUnreader

from rproxy.messages import BadRequest
from rproxy.server.request_parser import ChunkedReader, Request


class Held:
    """An unreader source that fails the test if read past what it holds."""

    def __init__(self, *pieces: bytes):
        self.pieces = list(pieces)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        assert self.pieces, "read past the size line"
        return self.pieces.pop(0)


class FakeRequest:
    limit_request_field_size = 8190
    max_buffer_headers = 8190 * 32


def reader(*pieces: bytes, limit: int = 1024) -> ChunkedReader:
    made = ChunkedReader(FakeRequest(), IterUnreader(Held(*pieces)))
    made.max_body_size = limit
    return made


@pytest.mark.parametrize("size_line", [b"401\r\n", b"ffffffff\r\n"])
def test_a_chunk_size_over_the_limit_is_413_before_its_data_is_read(size_line):
    with pytest.raises(BadRequest) as raised:
        reader(size_line).read(65536)
    assert raised.value.status == 413


def test_declared_sizes_count_up_to_the_limit():
    ok = reader(b"200\r\n" + b"a" * 0x200 + b"\r\n200\r\n" + b"b" * 0x200 + b"\r\n0\r\n\r\n")
    assert len(ok.read(4096)) == 1024
    over = reader(b"200\r\n" + b"a" * 0x200 + b"\r\n201\r\n")
    with pytest.raises(BadRequest):
        over.read(4096)


@pytest.mark.parametrize("size_line", [b"1" + b"0" * 21 + b"\r\n", b"f" * 100 + b"\r\n"])
def test_a_chunk_size_past_2_63_is_malformed_whatever_the_limit(size_line):
    for limit in (0, 1024):
        with pytest.raises(InvalidChunkSize):
            reader(size_line, limit=limit).read(10)


def test_without_a_limit_large_declared_sizes_stream():
    unlimited = reader(b"40000000\r\n" + b"x" * 100, limit=0)
    assert unlimited.read(100) == b"x" * 100


def request(head: bytes) -> Request:
    cfg = Config()
    return Request(cfg, IterUnreader(iter([head])), ("127.0.0.1", 1))


@pytest.mark.parametrize("count", [101, 256, 257, 300, 5000])
def test_too_many_header_fields_is_always_limit_request_headers(count):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(count)) + b"\r\n"
    with pytest.raises(LimitRequestHeaders):
        request(head)


def test_a_head_within_the_limits_parses():
    parsed = request(b"GET /a HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(99)) + b"\r\n")
    assert parsed.path == "/a" and len(parsed.headers) == 100
