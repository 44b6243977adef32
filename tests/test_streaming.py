"""Bodies stream both ways without piling up in the worker's memory."""

import gzip
import hashlib
import socket
import threading
import time

import requests
from conftest import raw_exchange, single_route
from requests_toolbelt.streaming_iterator import StreamingIterator
from upstream import PATTERN, pattern_bytes

GIB = 1 << 30
MIB = 1 << 20


class PeakRSS:
    """Samples a process's RSS in the background; .growth is peak minus start."""

    def __init__(self, process):
        self.process = process
        self.start = process.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self):
        return self.peak - self.start


def big_proxy(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"max_body_size": "0"})
    # Warm up the worker (imports, pools) before measuring.
    requests.post(proxy.url + "/upload", data=b"x" * MIB, timeout=10)
    requests.get(proxy.url + "/bytes?n=1048576", timeout=10)
    return proxy, proxy.workers()[0]


def expected_sha(n):
    digest = hashlib.sha256()
    for piece in pattern_bytes(n):
        digest.update(piece)
    return digest.hexdigest()


def test_1gib_upload_with_content_length_streams(start_proxy, upstream):
    proxy, worker = big_proxy(start_proxy, upstream)
    body = StreamingIterator(GIB, pattern_bytes(GIB))
    with PeakRSS(worker) as rss:
        r = requests.post(proxy.url + "/upload", data=body, timeout=120)
    assert r.status_code == 200
    assert r.json()["body_length"] == GIB
    assert r.json()["body_sha256"] == expected_sha(GIB)
    assert rss.growth < 50 * MIB, rss.growth


def test_1gib_chunked_upload_streams(start_proxy, upstream):
    proxy, worker = big_proxy(start_proxy, upstream)
    with PeakRSS(worker) as rss:
        r = requests.post(proxy.url + "/upload", data=pattern_bytes(GIB), timeout=120)
    assert r.status_code == 200
    echo = r.json()
    assert echo["body_length"] == GIB
    assert echo["body_sha256"] == expected_sha(GIB)
    assert ["Transfer-Encoding", "chunked"] in echo["headers"]
    assert rss.growth < 50 * MIB, rss.growth


def test_1gib_download_streams(start_proxy, upstream):
    proxy, worker = big_proxy(start_proxy, upstream)
    digest, total = hashlib.sha256(), 0
    with PeakRSS(worker) as rss:
        with requests.get(proxy.url + f"/bytes?n={GIB}", stream=True, timeout=120) as r:
            assert r.headers["Content-Length"] == str(GIB)
            for piece in r.iter_content(MIB):
                digest.update(piece)
                total += len(piece)
    assert total == GIB
    assert digest.hexdigest() == expected_sha(GIB)
    assert rss.growth < 50 * MIB, rss.growth


def test_event_stream_reaches_client_event_by_event(proxy, upstream):
    key = f"sse-{time.monotonic_ns()}"
    with requests.get(proxy.url + f"/sse?key={key}", stream=True, timeout=10) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = r.iter_lines()
        # The upstream holds the stream open after the first event until
        # released: the event can only arrive here if it was not buffered.
        assert next(lines) == b"data: first"
        requests.get(upstream.url + f"/release?key={key}", timeout=5)
        rest = [line for line in lines if line]
    assert rest == [b"data: second"]


def test_head_204_and_304_carry_no_body(proxy):
    r = requests.head(proxy.url + "/head", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Length"] == "5" and r.content == b""
    for code in (204, 304):
        raw = raw_exchange(proxy.port, f"GET /status/{code} HTTP/1.1\r\nHost: x\r\n"
                                       f"Connection: close\r\n\r\n".encode())
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {code}".encode())
        assert body == b""
        assert b"transfer-encoding" not in head.lower()
    # And on a kept-alive connection the next response follows cleanly.
    raw = raw_exchange(proxy.port, b"HEAD /head HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 3, raw
    assert b" 204 " in raw and raw.endswith(b"\r\n\r\nhello")


def test_upstream_that_sends_a_body_to_head_does_not_poison_the_pool(proxy):
    # The stray body stays on the pooled connection; the next request must
    # not read it as its response head.
    raw = raw_exchange(proxy.port, b"HEAD /head?leaky=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
                                   b"GET /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [line.split(b" ")[1] for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1")] \
        == [b"200", b"204", b"200"], raw


def test_gzip_body_passes_byte_identical(proxy):
    r = requests.get(proxy.url + "/gzip", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    raw = r.raw.read(decode_content=False)
    assert r.headers["Content-Encoding"] == "gzip"
    assert hashlib.sha256(raw).hexdigest() == r.headers["X-Body-Sha256"]
    assert gzip.decompress(raw) == b"compress me " * 1000


def test_chunked_upstream_response_is_rechunked_intact(proxy):
    r = requests.get(proxy.url + "/bytes?n=300000&chunked=1", timeout=10)
    assert r.headers.get("Transfer-Encoding") == "chunked"
    assert r.content == b"".join(pattern_bytes(300000))
    assert PATTERN[:10] == r.content[:10]


def one_connection_upstream(start_proxy, upstream):
    """rproxy allowed one connection to its upstream, waiting up to 10 s for it."""
    return start_proxy(single_route(upstream.port, upstream_extra="max_connections = 1\nconnect_timeout = 10s"))


def test_a_client_that_leaves_an_event_stream_frees_its_upstream_connection(start_proxy, upstream):
    # As nginx (unless proxy_ignore_client_abort): the held stream whose client
    # closed is cut within about two seconds, not when the upstream next sends.
    proxy = one_connection_upstream(start_proxy, upstream)
    key = f"sse-left-{time.monotonic_ns()}"  # never released: the upstream holds it 20 s
    with requests.get(proxy.url + f"/sse?key={key}", stream=True, timeout=10) as r:
        assert next(r.iter_lines()) == b"data: first"
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo/next", timeout=15)
    assert r.status_code == 200 and time.monotonic() - started < 8, (r.status_code, time.monotonic() - started)
    assert proxy.wait_for_log(r'"GET /sse\?key=sse-left-\d+ HTTP/1.1" 200 .*error="client left mid-response"')


def test_a_client_that_leaves_before_the_head_frees_its_upstream_connection(start_proxy, upstream):
    proxy = one_connection_upstream(start_proxy, upstream)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET /slow?delay=20 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # its request waits on the upstream's head
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo/next", timeout=15)
    assert r.status_code == 200 and time.monotonic() - started < 8, (r.status_code, time.monotonic() - started)
    assert proxy.wait_for_log(r'"GET /slow\?delay=20 HTTP/1.1" 499 ')
