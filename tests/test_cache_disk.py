"""The disk cache (storage = file:///dir): one store for every worker of a
host, surviving restarts, never serving a torn entry, bounded in size with
LRU eviction, streaming large bodies; concurrent misses reach the origin once
per host. The store in-process first, then through a real multi-worker proxy."""

import concurrent.futures
import itertools
import json
import os
import socket
import ssl
import time

import psutil
import pytest
import requests
import httpx
from conftest import single_route
from upstream import pattern_bytes

from rproxy.httpcache.disk import INLINE, TEMP_PREFIX, DiskStore, FileBody
from rproxy.httpcache.rules import Entry

_unique = itertools.count()


def entry(body: bytes, max_age: int = 60) -> Entry:
    now = time.time()
    return Entry(200, "OK", [("Cache-Control", f"max-age={max_age}"), ("Content-Length", str(len(body)))],
                 body, now, now)


def body_of(stored: Entry) -> bytes:
    return b"".join(stored.body) if isinstance(stored.body, FileBody) else stored.body


# -- the store, in-process ---------------------------------------------------

def test_an_entry_written_by_one_worker_is_read_by_another(tmp_path):
    one, other = DiskStore(str(tmp_path), 1 << 20), DiskStore(str(tmp_path), 1 << 20)
    one.put("http://a/x", [entry(b"hello")])
    [got] = other.get("http://a/x")
    assert (got.status, body_of(got), got.headers[0]) == (200, b"hello", ("Cache-Control", "max-age=60"))
    other.delete("http://a/x")
    assert one.get("http://a/x") == []


def test_a_large_body_is_streamed_from_the_file_not_read(tmp_path):
    store = DiskStore(str(tmp_path), 16 << 20)
    big = os.urandom(3 * INLINE + 5)
    store.put("k", [entry(big)])
    [got] = store.get("k")
    assert isinstance(got.body, FileBody) and len(got.body) == len(big)
    store.put("k", [entry(b"new")])  # replaced meanwhile: the open file still reads the old one
    chunks = list(got.body)
    assert b"".join(chunks) == big and max(map(len, chunks)) <= INLINE


def test_a_truncated_entry_is_never_served_and_is_removed(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    store.put("k", [entry(b"x" * 1000)])
    [path] = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    path.write_bytes(path.read_bytes()[:-10])  # a machine crash before the data reached the disk
    assert store.get("k") == [] and not path.exists()
    path.write_bytes(b"garbage")
    assert store.get("k") == []


def test_temporary_files_of_dead_writers_are_removed_at_start(tmp_path):
    dead = psutil.Popen(["true"])
    dead.wait()
    left = tmp_path / f"{TEMP_PREFIX}{dead.pid}.abc"
    left.write_bytes(b"RPC1 half written")
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}.abc"  # a running worker's write in progress
    live.write_bytes(b"RPC1 being written")
    DiskStore(str(tmp_path), 1 << 20)
    assert not left.exists() and live.exists()


def test_over_the_size_bound_the_least_recently_used_entries_go(tmp_path):
    store = DiskStore(str(tmp_path), 10_000)
    for name in "abc":
        store.put(name, [entry(b"x" * 2500)])
        past = time.time() - 100 + ord(name)  # mtime has a coarse resolution on some file systems
        os.utime(store._file(name), (past, past))
    store.get("a")  # used: now the most recent
    store.put("d", [entry(b"x" * 2500)])
    assert [bool(store.get(k)) for k in "abcd"] == [True, False, True, True]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 10_000


def test_an_entry_larger_than_the_bound_is_not_stored(tmp_path):
    store = DiskStore(str(tmp_path), 1000)
    store.put("k", [entry(b"x" * 2000)])
    assert store.get("k") == [] and list(tmp_path.iterdir()) == []


def test_an_expired_entry_without_validators_is_dropped(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    old = entry(b"x", max_age=1)
    old.request_time = old.response_time = time.time() - 10
    store.put("k", [old])
    assert store.get("k") == []


def test_the_key_lock_is_held_by_one_at_a_time_and_freed(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20)
    first, second = store.lock("k"), store.lock("k")
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    assert [p for p in tmp_path.iterdir()] == []  # no lock file left behind


def test_a_streamed_body_read_as_a_file_stops_at_its_own_end(tmp_path):
    # Two variants in one file: the first body, read as a file, must not run into the second.
    store = DiskStore(str(tmp_path), 1 << 30)
    first, second = entry(b"a" * (INLINE + 10)), entry(b"b" * (INLINE + 20))
    first.vary = second.vary = {"accept": None}
    store.put("k", [first, second])
    body = store.get("k")[0].body
    file = body.as_file()
    assert os.lseek(file.fileno(), 0, os.SEEK_CUR) == body.offset  # where a server's sendfile starts
    read = b""
    while piece := file.read(4096):
        read += piece
    assert read == b"a" * (INLINE + 10) and file.read() == b""
    file.close()


# -- through the proxy --------------------------------------------------------

def disk_ini(upstream_port: int, folder, extra: str = "") -> str:
    return single_route(upstream_port) + f"\n[cache]\nstorage = file://{folder}\n{extra}"


def cacheable(proxy, **query) -> str:
    query.setdefault("id", f"disk{next(_unique)}")
    return proxy.url + "/cacheable?" + "&".join(f"{k}={v}" for k, v in query.items())


def stored_file(folder):
    """The one entry in `folder`, once it is there: a response may reach the
    client a moment before the worker has stored it."""
    deadline = time.monotonic() + 10
    while not (found := [p for p in folder.iterdir() if not p.name.startswith(".")]):
        assert time.monotonic() < deadline, "the response was not stored"
        time.sleep(0.02)
    [path] = found
    return path


def test_fifty_concurrent_misses_over_four_workers_reach_the_origin_once(start_proxy, upstream, tmp_path):
    proxy = start_proxy(disk_ini(upstream.port, tmp_path / "cache"), workers=4)
    target = cacheable(proxy, cc="max-age=60", delay="1")

    def fetch(_):
        r = requests.get(target, timeout=20)
        return r.status_code, r.json()["n"], r.headers["X-Cache"]

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(fetch, range(50)))
    assert {(status, n) for status, n, _ in answers} == {(200, 1)}  # the origin answered once
    assert sorted(label for _, _, label in answers).count("MISS") == 1


def test_cached_entries_survive_a_proxy_restart(start_proxy, upstream, tmp_path):
    ini = disk_ini(upstream.port, tmp_path / "cache")
    first = start_proxy(ini, workers=2)
    target = cacheable(first, cc="max-age=60")
    host = {"Host": "cache.test"}  # the key holds the Host, and the new proxy has another port
    assert requests.get(target, headers=host, timeout=10).json()["n"] == 1
    stored_file(tmp_path / "cache")
    first.stop()
    again = start_proxy(ini, workers=2)
    r = requests.get(target.replace(first.url, again.url), headers=host, timeout=10)
    assert (r.headers["X-Cache"], r.json()["n"]) == ("HIT", 1)


def test_a_torn_entry_in_the_directory_is_fetched_again_not_served(start_proxy, upstream, tmp_path):
    folder = tmp_path / "cache"
    proxy = start_proxy(disk_ini(upstream.port, folder), workers=2)
    target = cacheable(proxy, cc="max-age=60", size="5000")
    requests.get(target, timeout=10)
    path = stored_file(folder)
    path.write_bytes(path.read_bytes()[:-100])
    r = requests.get(target, timeout=10)
    assert (r.headers["X-Cache"], r.json()["n"], len(r.content)) == ("MISS", 2, 5000)


def test_a_large_cached_body_streams_from_disk_without_a_copy_per_response(start_proxy, upstream, tmp_path):
    size = 4 << 20
    proxy = start_proxy(disk_ini(upstream.port, tmp_path / "cache", "max_entry_size = 8m\n"))
    target = cacheable(proxy, cc="max-age=60", size=str(size))
    for _ in range(2):  # stored, then served once from the disk
        assert len(requests.get(target, timeout=20).content) == size
    [worker] = proxy.workers()
    before = worker.memory_info().rss
    held = []
    try:
        for _ in range(10):  # ten slow readers, each with a response in progress
            r = requests.get(target, timeout=20, stream=True)
            assert r.headers["X-Cache"] == "HIT"
            next(r.iter_content(1024))
            held.append(r)
        time.sleep(0.5)
        grown = worker.memory_info().rss - before
    finally:
        for r in held:
            r.close()
    # A body read into memory per response would add 10 x 4 MiB.
    assert grown < 16 << 20, f"worker RSS grew by {grown >> 20} MiB"


def test_a_relative_file_storage_is_a_config_error_naming_the_key(tmp_path):
    from rproxy import config
    ini = tmp_path / "rproxy.ini"
    ini.write_text(single_route(9) + "\n[cache]\nstorage = file://var/cache\n")
    with pytest.raises(Exception) as error:
        config.load(str(ini))
    message = str(error.value)
    assert "[cache]" in message and "storage" in message and "file:///var/cache/rproxy" in message


MIB = 1 << 20


def read_response(sock) -> tuple[bytes, bytes, int]:
    """The head of an HTTP/1.1 response with a Content-Length, from a raw socket: (head, the body bytes read with it, the length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    return head, body, length


def test_a_disk_hit_sent_by_sendfile_has_one_head_first_and_the_connection_goes_on(start_proxy, upstream, tmp_path):
    proxy = start_proxy(disk_ini(upstream.port, tmp_path / "cache", "max_entry_size = 4m\n"))
    target = cacheable(proxy, cc="max-age=60", size=str(MIB), pattern="1")
    origin = requests.get(target, timeout=20).content
    stored_file(tmp_path / "cache")
    path = target[len(proxy.url):]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
        for method in ("GET", "HEAD", "GET"):  # one keep-alive connection: each response framed exactly
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
            head, body, length = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200 ") and head.count(b"HTTP/1.1") == 1
            assert b"X-Cache: HIT" in head and b"Age: " in head and length == MIB
            want = 0 if method == "HEAD" else MIB
            while len(body) < want:
                body += sock.recv(65536)
            assert body == (origin if method == "GET" else b"")
    assert requests.get(target, timeout=20).headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("way", ["http/1.1", "tls http/1.1", "tls http/2", "h2c"])
def test_a_one_mib_disk_hit_is_sent_whole_and_byte_exact(way, start_proxy, upstream, certs, tmp_path):
    server = {}
    if way.startswith("tls"):
        server = {"certfile": certs.cert, "keyfile": certs.key, "http2": "yes"}
    elif way == "h2c":
        server = {"http2": "yes", "http2_cleartext": "yes"}
    proxy = start_proxy(disk_ini(upstream.port, tmp_path / "cache", "max_entry_size = 4m\n"), server=server)
    base = f"https://127.0.0.1:{proxy.port}" if way.startswith("tls") else proxy.url
    target = cacheable(proxy, cc="max-age=60", size=str(MIB), pattern="1").replace(proxy.url, base)
    h2 = way in ("tls http/2", "h2c")
    with httpx.Client(http1=not h2, http2=h2, verify=ssl.create_default_context(cafile=certs.ca_file),
                      timeout=20) as client:
        miss = client.get(target)
        stored_file(tmp_path / "cache")
        hits = [client.get(target) for _ in range(2)]
    assert miss.headers["X-Cache"] == "MISS" and len(miss.content) == MIB
    prefix = miss.content[:miss.content.index(b"}") + 1]
    assert miss.content == prefix + b"".join(pattern_bytes(MIB - len(prefix)))
    for hit in hits:
        assert hit.http_version == ("HTTP/2" if h2 else "HTTP/1.1")
        assert (hit.status_code, hit.headers["X-Cache"], hit.headers["Content-Length"]) == (200, "HIT", str(MIB))
        assert hit.content == miss.content


def pattern_body(content: bytes) -> bytes:
    """What /cacheable?pattern=1 sends with the same JSON start as `content`."""
    prefix = content[:content.index(b"}") + 1]
    return prefix + b"".join(pattern_bytes(len(content) - len(prefix)))


def answered(response) -> int:
    """How many times the origin had answered for this URL (the body's JSON start)."""
    return json.loads(response.content[:response.content.index(b"}") + 1])["n"]


def test_a_worker_killed_while_writing_an_entry_leaves_no_torn_entry(start_proxy, upstream, tmp_path):
    # The entry is written once its body has been read whole: a large one
    # takes a while to write, and the worker is SIGKILLed as soon as its
    # temporary file appears. gunicorn starts another worker; whatever the
    # kill left, the next request goes to the origin and the entry is stored whole.
    folder, size = tmp_path / "cache", 48 << 20
    proxy = start_proxy(disk_ini(upstream.port, folder, "max_entry_size = 64m\n"))
    kills = 0
    for _ in range(5):
        [worker] = proxy.workers()
        target = cacheable(proxy, cc="max-age=60", size=str(size), pattern="1")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(requests.get, target, timeout=60)
            deadline, temp = time.monotonic() + 60, []
            while not temp and time.monotonic() < deadline and not answer.done():
                temp = [p for p in os.listdir(folder) if p.startswith(TEMP_PREFIX)] if folder.exists() else []
            if temp:
                worker.kill()
                kills += 1
            try:
                answer.result()
            except requests.RequestException:
                pass  # cut by the kill: the response had not quite reached the client
        assert temp or stored_file(folder), "the entry was never written"
        stored = [p for p in folder.iterdir() if not p.name.startswith(".")]
        torn = bool(temp) and not stored  # killed before the rename: a temporary file is all there is
        if temp:
            # The next worker is up (and has removed what the dead one left).
            proxy.wait_for_log(r"rproxy worker \d+ ready", count=1 + kills)
        if stored:  # killed after the rename, or never: the entry must be whole
            assert os.path.getsize(stored[0]) > size
        again = requests.get(target, timeout=60)
        if torn:
            assert (again.headers["X-Cache"], answered(again)) == ("MISS", 2)
        assert again.content == pattern_body(again.content) and len(again.content) == size
        if torn:
            assert not [p for p in os.listdir(folder) if p.startswith(f"{TEMP_PREFIX}{worker.pid}.")]
            stored_file(folder)
            hit = requests.get(target, timeout=60)
            assert (hit.headers["X-Cache"], answered(hit), hit.content) == ("HIT", 2, again.content)
            return
        for path in folder.iterdir():  # the next attempt starts from an empty directory
            if not path.name.startswith(".lock"):
                path.unlink()
    pytest.fail("no attempt killed the worker while its entry was half written")
