"""The disk store: cached responses as files in one directory, shared by every
worker of a host (`storage = file:///var/cache/rproxy`, like nginx's
proxy_cache_path).

One file per key (its name the SHA-256 of the key) holds the variants of a
URL: a header (status, headers, times, body sizes, the key itself) and the
bodies. A file is written under a temporary name in the same directory and
then renamed over the old one, so a reader sees the old file or the new one,
never half of one; a worker killed mid-write leaves only a temporary file,
removed at the next start once its writer is gone. A file whose length does
not match its header (a crash of the machine before the data reached the
disk) is deleted, not served. Large bodies are not read into memory: a hit
carries an open file and streams it in chunks (FileBody); the open file keeps
the response readable even when another worker replaces or evicts it
meanwhile.

The total size is bounded by `max_size`: a read touches the file's mtime
(at most every TOUCH seconds: a metadata write per hit costs), and
when a worker's count of the directory's size (its last scan plus what it
wrote since) goes over the bound, or its last scan is older than
RESCAN seconds, it scans the directory and deletes the least recently used
files down to LOW_WATER of the bound. Several workers may scan at once:
deleting a file twice is harmless. Between scans, what the other workers
wrote is not counted, so the directory can exceed the bound by what they
write in RESCAN seconds.

A purge (purge.py) of one URL deletes its file; of a prefix or a tag, it
scans the directory, reading each file's header.

KeyLock is the lock by which one worker of the host fetches a missing URL
while the others wait for it (middleware/cache.py): an flock'ed file, taken
without blocking so that a gevent worker is never stopped; the kernel frees
it when its holder dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict

from rproxy.httpcache.purge import tags_of
from rproxy.httpcache.rules import Entry
from rproxy.httpcache.store import Retention

MAGIC = b"RPC1"
CHUNK = 64 * 1024
INLINE = 64 * 1024  # bodies up to this size are read at once; larger ones stream
LOW_WATER = 0.9     # eviction frees down to this share of max_size, so that it does not run on every write
RESCAN = 5.0        # seconds: how stale a worker's view of the directory's size may get
TEMP_PREFIX = ".tmp."
LOCK_PREFIX = ".lock."
TEMP_MAX_AGE = 3600.0  # a temporary file this old is left over, whoever wrote it
TOUCH = 1.0         # seconds: a read renews its file's mtime (the LRU order) at most this often
HEADS = 512         # decoded file headers a worker keeps, by key: a hit whose header bytes
                    # are the same skips the JSON and the freshness arithmetic


class FileBody:
    """A stored body read from an open cache file: in chunks when iterated,
    or, after as_file(), as a file (read, fileno, close) for the WSGI
    server's file wrapper, which sends it with sendfile on plain sockets."""

    __slots__ = ("file", "offset", "length", "pos")

    def __init__(self, file, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length
        self.pos = offset

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        fd, pos, end = self.file.fileno(), self.offset, self.offset + self.length
        while pos < end:
            chunk = os.pread(fd, min(CHUNK, end - pos), pos)
            if not chunk:  # cannot happen for a checked file; never loop on it
                raise OSError(f"cache file {self.file.name} ends early")
            pos += len(chunk)
            yield chunk

    def as_file(self) -> FileBody:
        # A server's sendfile starts at the file's position (gunicorn's
        # Response.sendfile: lseek(fd, 0, SEEK_CUR)) and sends Content-Length
        # bytes: the position is set to the body's start here; read() uses
        # pread and leaves it there.
        os.lseek(self.file.fileno(), self.offset, os.SEEK_SET)
        self.pos = self.offset
        return self

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of the body (never past its end: the bodies of
        other variants may follow in the file)."""
        left = self.offset + self.length - self.pos
        if size < 0 or size > left:
            size = left
        if size <= 0:
            return b""
        chunk = os.pread(self.file.fileno(), size, self.pos)
        self.pos += len(chunk)
        return chunk

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


def body_chunks(body) -> list[bytes] | FileBody:
    """A stored body as an iterable of chunks, whichever store it came from."""
    return body if isinstance(body, FileBody) else [body]


class DiskStore:
    def __init__(self, path: str, max_size: int, retention: Retention | None = None):
        self.path = path
        self.max_size = max_size
        self.retention = retention or Retention()
        os.makedirs(path, exist_ok=True)
        self.heads: OrderedDict[str, tuple[bytes, list[Entry], list[int]]] = OrderedDict()
        self.known = 0           # the directory's size as this worker last counted it, plus its writes
        self.scanned = 0.0       # when it last counted
        self._remove_leftovers()
        self._evict()

    def _file(self, key: str) -> str:
        return os.path.join(self.path, hashlib.sha256(key.encode()).hexdigest())

    def lock(self, key: str, expiry: float = 0.0) -> KeyLock:
        """The lock of `key`; it needs no expiry: the kernel frees it when its holder dies."""
        return KeyLock(os.path.join(self.path, LOCK_PREFIX + hashlib.sha256(key.encode()).hexdigest()))

    def get(self, key: str) -> list[Entry]:
        path = self._file(key)
        try:
            file = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return []
        try:
            stat = os.fstat(file.fileno())
            entries = self._read(file, key, stat.st_size)
        except (ValueError, KeyError, TypeError, OSError):
            entries = None
        if entries is None:  # torn or foreign: never served
            file.close()
            self._unlink(path)
            return []
        if not any(isinstance(e.body, FileBody) for e in entries):
            file.close()
        if self.retention.keep_for(entries) <= 0:
            self._unlink(path)
            return []
        if time.time() - stat.st_mtime >= TOUCH:
            try:
                os.utime(path)  # recently used: evicted last
            except FileNotFoundError:
                pass
        return entries

    def _read(self, file, key: str, total: int) -> list[Entry] | None:
        fd = file.fileno()
        start = os.pread(fd, 8, 0)
        if len(start) < 8 or start[:4] != MAGIC:
            return None
        head_size = int.from_bytes(start[4:], "big")
        raw = os.pread(fd, head_size, 8)
        known = self.heads.get(key)
        if known is not None and known[0] == raw:
            self.heads.move_to_end(key)
            metas, sizes = known[1], known[2]
        else:
            head = json.loads(raw)
            if head["key"] != key:  # a hash collision, or another file renamed here
                return None
            sizes = [m["size"] for m in head["entries"]]
            metas = [Entry(m["status"], m["reason"], [tuple(h) for h in m["headers"]], b"",
                           m["request_time"], m["response_time"], m["vary"]) for m in head["entries"]]
            self.heads[key] = (raw, metas, sizes)
            if len(self.heads) > HEADS:
                self.heads.popitem(last=False)
        pos = 8 + head_size
        if pos + sum(sizes) != total:
            return None
        entries = []
        for meta, size in zip(metas, sizes):
            body = os.pread(fd, size, pos) if size <= INLINE else FileBody(file, pos, size)
            pos += size
            entry = Entry(meta.status, meta.reason, meta.headers, body, meta.request_time,
                          meta.response_time, meta.vary, meta.targets)
            entry._derived = meta.derived()  # computed once per head read, not per hit
            entries.append(entry)
        return entries

    def put(self, key: str, entries: list[Entry]) -> None:
        if not entries or self.retention.keep_for(entries) <= 0:
            self.delete(key)
            return
        meta = [{"status": e.status, "reason": e.reason, "headers": e.headers, "request_time": e.request_time,
                 "response_time": e.response_time, "vary": e.vary, "size": len(e.body)} for e in entries]
        head = json.dumps({"key": key, "entries": meta}).encode()
        size = 8 + len(head) + sum(len(e.body) for e in entries)
        if size > self.max_size:
            self.delete(key)
            return
        temp = os.path.join(self.path, f"{TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(6)}")
        try:
            with open(temp, "wb") as out:
                out.write(MAGIC + len(head).to_bytes(4, "big") + head)
                for entry in entries:
                    for chunk in body_chunks(entry.body):
                        out.write(chunk)
            os.replace(temp, self._file(key))  # atomic: readers see the old file or this one
        except BaseException:
            self._unlink(temp)
            raise
        self.known += size
        if self.known > self.max_size or time.monotonic() - self.scanned > RESCAN:
            self._evict()

    def delete(self, key: str) -> int:
        return self._unlink(self._file(key))

    def purge_prefix(self, prefix: str) -> int:
        return self._purge(lambda head: head["key"].startswith(prefix))

    def purge_tag(self, tag: str) -> int:
        return self._purge(lambda head: any(tag in tags_of(m["headers"]) for m in head["entries"]))

    def _purge(self, matches) -> int:
        """Deletes the files whose header `matches`: a scan of the directory,
        reading each file's header only (bounded by max_size; no index to
        keep in step with renames and evictions by other workers)."""
        purged = 0
        with os.scandir(self.path) as found:
            for item in found:
                if item.name.startswith("."):
                    continue
                try:
                    with open(item.path, "rb", buffering=0) as file:
                        start = os.pread(file.fileno(), 8, 0)
                        if start[:4] != MAGIC:
                            continue
                        head = json.loads(os.pread(file.fileno(), int.from_bytes(start[4:8], "big"), 8))
                except (OSError, ValueError):
                    continue
                try:
                    hit = matches(head)
                except (KeyError, TypeError, AttributeError):  # not a header this store wrote
                    continue
                if hit:
                    purged += self._unlink(item.path)
        return purged

    def _evict(self) -> None:
        """Count the directory; over the bound, delete the least recently used files."""
        files = []
        with os.scandir(self.path) as found:
            for item in found:
                if item.name.startswith("."):
                    continue
                try:
                    stat = item.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime, stat.st_size, item.path))
        total = sum(size for _, size, _ in files)
        if total > self.max_size:
            files.sort()
            for _, size, path in files:
                if total <= self.max_size * LOW_WATER:
                    break
                self._unlink(path)
                total -= size
        self.known, self.scanned = total, time.monotonic()

    def _remove_leftovers(self) -> None:
        """Temporary files of writers that died mid-write."""
        now = time.time()
        with os.scandir(self.path) as found:
            for item in found:
                if not item.name.startswith(TEMP_PREFIX):
                    continue
                try:
                    pid = int(item.name[len(TEMP_PREFIX):].split(".")[0])
                    old = now - item.stat().st_mtime > TEMP_MAX_AGE
                except (ValueError, FileNotFoundError):
                    pid, old = 0, True
                if old or not _alive(pid):
                    self._unlink(item.path)

    @staticmethod
    def _unlink(path: str) -> int:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return 1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class KeyLock:
    """An exclusive lock on one key across the processes of a host.
    `acquire()` never blocks: it says whether it got the lock."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str):
        self.path, self.fd = path, -1

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us removes the file as it lets go: a lock on
            # that removed file guards nothing, the next one is made anew.
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except (BlockingIOError, FileNotFoundError):
            same = False
        except BaseException:
            os.close(fd)
            raise
        if not same:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)  # while still held, so no one holds a lock on a removed file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1
