"""HTTP cache (RFC 9111, shared cache), between the filter and the upstream.

GET responses that may be stored are kept in memory (an LRU per worker), on
disk (httpcache/disk.py: shared by the workers of a host) or in Redis (shared
by every worker and instance); HEAD is answered from them too.
Fresh entries are served with an Age header; stale ones are revalidated with
If-None-Match / If-Modified-Since and refreshed on 304. Clients' own
conditional requests are answered from the cache. Concurrent misses for one
URL in a worker send one request upstream and the others wait for it when it
turns out cacheable; with the disk store, one worker of the host sends it and
the others wait for it too (a lock file per URL), and with Redis one worker
of the fleet (a lock key that expires), at most collapse_timeout. A
successful POST, PUT, PATCH or DELETE invalidates the stored entry of its URL
(so does any method not known to be safe). Every response says what happened:
X-Cache: HIT, MISS, EXPIRED (stale, asked the upstream), STALE (answered
from a stale entry: see httpcache/stale.py) or BYPASS; and Cache-Status (RFC
9211) says the same in the standard's terms. Under stale-while-revalidate, a
stale entry answers at once and one background greenlet per key and worker
revalidates it (httpcache/revalidation.py); when the upstream fails (down,
timing out, 5xx) and the response's or request's stale-if-error or the
`use_stale` switch allows, the stale entry answers instead of the error, and
a log line says so. A response too large for an entry streams through
untouched (httpcache/bodies.py). When Redis fails, the cache is bypassed,
logged once, and left alone for
`storage_retry` (storage_guard.py), so that requests do not each wait for a
hung Redis; it is used again when Redis is back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import gevent
from gevent.event import Event

from rproxy.httpcache import stale
from rproxy.httpcache.bodies import Tee, discard, drain
from rproxy.httpcache.disk import CHUNK, DiskStore, FileBody, KeyLock
from rproxy.httpcache.revalidation import CONDITIONALS, refreshed, revalidate_later
from rproxy.httpcache.rules import (
    Entry,
    directives,
    fresh_enough,
    header,
    not_modified,
    selects,
    storable,
    vary_keys,
)
from rproxy.httpcache.store import MemoryStore, RedisLock, RedisStore, Retention
from rproxy.messages import Request, Response
from rproxy.observability import metrics
from rproxy.storage_guard import StorageGuard
from rproxy.values import cache_storage_uri, header_names, positive_duration, setting, size

log = logging.getLogger("rproxy.cache")
CACHE_STATUS = "rproxy"  # this cache's name in Cache-Status

# Any other method, known or not, invalidates what it succeeds on (RFC 9111 4.4).
SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Sent with a 304 from the cache (RFC 9110 15.4.5).
NOT_MODIFIED_HEADERS = frozenset({"etag", "cache-control", "expires", "vary", "content-location",
                                  "last-modified", "age", "x-cache", "cache-status"})


@dataclass(frozen=True)
class CacheConfig:
    name: str
    max_size: int = setting("256m", size, "Total size of the cache: per worker in memory, per host on disk.")
    max_entry_size: int = setting("8m", size, "Largest response stored; larger ones stream through.")
    storage: str = setting("memory://", cache_storage_uri,
                           "memory:// (per worker), file:///path/to/dir (a directory shared by the workers "
                           "of a host) or redis://host:port/db (shared by every instance; also "
                           "rediss://, redis+sentinel://host:port/service, "
                           "redis+cluster://host:port,host:port).")
    storage_timeout: float = setting("500ms", positive_duration, "Longest wait for Redis.")
    storage_retry: float = setting("5s", positive_duration,
                                   "After Redis fails or times out, how long the cache is bypassed "
                                   "without asking it; then one request tries it again.")
    collapse_timeout: float = setting("10s", positive_duration,
                                      "How long concurrent misses for one URL wait for the first one.")
    targeted_fields: tuple[str, ...] = setting("", header_names,
                                               "Targeted cache-control fields (RFC 9213) this cache obeys "
                                               "instead of Cache-Control, first present wins: "
                                               "e.g. rproxy-Cache-Control CDN-Cache-Control.")
    use_stale: frozenset = setting("off", stale.use_stale,
                                   "Upstream failures on which a stale stored response answers instead "
                                   "of the error, in nginx's proxy_cache_use_stale names: error (cannot "
                                   "connect, connection lost, no server available), timeout, http_500, http_502, http_503, "
                                   "http_504; off = only where the response's or the request's "
                                   "stale-if-error allows it.")
    stale_keep: float = setting("1h", positive_duration,
                                "How long past freshness stale responses are kept: those with "
                                "validators, to revalidate them, and all of them when use_stale is on "
                                "(and as long as their stale-while-revalidate/stale-if-error asks).")


class HTTPCache:
    def __init__(self, config: CacheConfig, shared: dict):
        stores = shared.setdefault("cache_stores", {})
        store_key = (config.storage, config.name)
        if store_key not in stores:
            stores[store_key] = open_store(config)
        self.store = stores[store_key]
        self.config = config
        self.inflight: dict[str, Event] = {}
        self.held: dict[str, KeyLock | RedisLock] = {}  # key -> the store's lock its fetch holds (disk, Redis)
        self.lockable = hasattr(self.store, "lock")
        self.revalidating: set[str] = set()  # keys revalidated in the background now
        self.guard = StorageGuard(f"cache:{config.name}", config.storage, config.storage_retry,
                                  "bypassing the cache")

    def __call__(self, request: Request, call_next) -> Response:
        method = request.method
        if method not in ("GET", "HEAD"):
            response = call_next(request)
            if method not in SAFE and 200 <= response.status < 400:
                self._invalidate(request, response)
            return response
        if "Range" in request.headers or "no-store" in directives(request.headers.get("Cache-Control")):
            return _tag(request, call_next(request), "BYPASS", "fwd=bypass")
        key = self._key(request)
        looked = time.perf_counter()
        found = self.lookup(key, request)
        request.record.cache_ms = (time.perf_counter() - looked) * 1000
        if found is None:  # storage down
            return _tag(request, call_next(request), "BYPASS", "fwd=bypass")
        entries, entry = found
        if entry is not None:
            if fresh_enough(entry, request.headers):
                return self._serve(request, entry, "HIT")
            if not request.has_body and stale.while_revalidating(entry, request.headers):
                if key not in self.revalidating:
                    revalidate_later(self, request, call_next, key, entry)
                return self._serve(request, entry, "STALE", "hit; detail=stale-while-revalidate")
        if entry is None and key in self.inflight:
            # Someone in this worker is fetching it already: wait, then look again.
            self.inflight[key].wait(self.config.collapse_timeout)
            found = self.lookup(key, request)
            if found is not None and found[1] is not None and fresh_enough(found[1], request.headers):
                return self._serve(request, found[1], "HIT")
            entries, entry = found if found is not None else ([], None)
        if entry is None and self.lockable and method == "GET" and key not in self.inflight:
            self.inflight[key] = Event()  # this worker's others wait for us, we for the host
            try:
                if self._wait_for_host(key):
                    found = self.lookup(key, request)
                    if found is not None and found[1] is not None and fresh_enough(found[1], request.headers):
                        self._finish(key, True)
                        return self._serve(request, found[1], "HIT")
                    entries, entry = found if found is not None else ([], None)
            except BaseException:
                self._finish(key, True)
                raise
            return self._fetch(request, call_next, key, entries, entry, leader=True)
        return self._fetch(request, call_next, key, entries, entry)

    def _wait_for_host(self, key: str) -> bool:
        """Takes the lock of `key` in the store (a host's or a fleet's), so that
        one worker fetches it; waits while another worker holds it, at most
        collapse_timeout. True when it waited: the entry may be there now,
        and the lock is not held (those who waited go on together, as they
        do in a worker, should the response turn out not to be storable)."""
        lock = self.store.lock(key, self.config.collapse_timeout)
        deadline = time.monotonic() + self.config.collapse_timeout
        pause, waited = 0.005, False
        try:
            while not lock.acquire():
                if time.monotonic() >= deadline:
                    return True
                waited = True
                gevent.sleep(pause)  # never block the worker's other connections
                pause = min(pause * 2, 0.05)
        except Exception as e:  # the disk or Redis failing: go on without the cache
            self.guard.failed(e)
            return False
        if waited:  # someone else fetched it meanwhile
            lock.release()
            return True
        self.held[key] = lock
        return False

    def _fetch(self, request: Request, call_next, key: str, entries: list[Entry], entry: Entry | None,
               leader: bool = False) -> Response:
        headers = request.headers
        # The client's own conditions are answered here, from what we store.
        theirs = {name: headers.pop(name) for name in CONDITIONALS if name in headers}
        if entry is not None:
            headers.update(entry.validators())
        if not leader and entry is None and request.method == "GET" and key not in self.inflight:
            leader = True
            self.inflight[key] = Event()
        request_time = time.time()
        try:
            response = call_next(request)
        except BaseException:
            self._finish(key, leader)
            raise
        finally:
            for name in CONDITIONALS:
                headers.pop(name, None)
            headers.update(theirs)
        response_time = time.time()

        if entry is not None and response.status == 304:
            drain(response)
            renewed = refreshed(entry, response, request_time, response_time)
            self.save(key, [e for e in entries if e is not entry], renewed)
            return self._serve(request, renewed, "EXPIRED", "fwd=stale; fwd-status=304")
        if entry is not None and response.status >= 500:
            stand_in = self._instead_of_failure(request, response, entry)
            if stand_in is not None:
                return stand_in
        if entry is not None:
            label, status = "EXPIRED", f"fwd=stale; fwd-status={response.status}"
        else:
            label, status = "MISS", f"fwd={'vary-miss' if entries else 'uri-miss'}; fwd-status={response.status}"
        ok, _ = storable(request.method, headers, response.status, response.headers, self.config.targeted_fields)
        if not ok:
            self._finish(key, leader)
            if entry is not None and response.status < 500:
                self.save(key, [e for e in entries if e is not entry], None)
            return _tag(request, response, label, status)

        upstream_headers = list(response.headers)  # before _tag trims them for the client

        def store(body: bytes | None) -> None:
            if body is not None:
                fresh = Entry(response.status, response.reason, upstream_headers, body,
                              request_time, response_time, vary_keys(upstream_headers, headers),
                              self.config.targeted_fields)
                self.save(key, [e for e in entries if e.vary != fresh.vary], fresh)
            self._finish(key, leader)
        response.body = Tee(response.body, self.config.max_entry_size, store, _length(upstream_headers))
        return _tag(request, response, label, status)

    def _instead_of_failure(self, request: Request, response: Response, entry: Entry) -> Response | None:
        """The stale entry, answering instead of an upstream failure where
        allowed; None to pass the failure on."""
        # The forwarder notes its own answers (can't connect, timed out) there.
        generated = request.record.error is not None
        what = stale.failure(response.status, generated)
        allowed = what and stale.on_failure(entry, request.headers, what, self.config.use_stale,
                                            self.config.stale_keep)
        if not allowed:
            return None
        discard(response)
        served = self._serve(request, entry, "STALE",
                             "fwd=stale" + ("" if generated else f"; fwd-status={response.status}")
                             + f"; detail={what}")
        log.warning("cache: upstream failed (%s) for %s %s; serving the stored response instead, "
                    "%s stale, as %s allows, request_id=%s", request.record.error or what,
                    request.method, request.target, f"{stale.staleness(entry):.0f}s", allowed,
                    request.request_id)
        return served

    def _serve(self, request: Request, entry: Entry, label: str, status: str = "hit") -> Response:
        _count(request, label, len(entry.body) if label == "HIT" and request.method == "GET" else 0)
        headers = entry.derived().served_headers.copy()
        age = entry.age()
        if status[:3] == "hit":
            status += f"; ttl={int(entry.freshness_lifetime() - age)}"
        headers += [("Age", str(int(age))), ("X-Cache", label), ("Cache-Status", f"{CACHE_STATUS}; {status}")]
        if not_modified(entry, request.headers):
            return Response(304, [(k, v) for k, v in headers if k.lower() in NOT_MODIFIED_HEADERS], [b""])
        return Response(entry.status, headers, _body(request, entry) if request.method == "GET" else [b""],
                        entry.reason)

    def _key(self, request: Request) -> str:
        return cache_key(request)

    def lookup(self, key: str, request: Request):
        """The stored variants of `key` and the one for this request; None
        when the storage is down or left alone."""
        if not self.guard.allow():
            return None
        try:
            entries = self.store.get(key)
        except Exception as e:  # Redis down or slow
            self.guard.failed(e)
            return None
        self.guard.succeeded()
        for entry in entries:  # what the store keeps is the response; which fields count is config
            entry.targets = self.config.targeted_fields
        return entries, next((e for e in entries if selects(e, request.headers)), None)

    def save(self, key: str, others: list[Entry], entry: Entry | None) -> None:
        if not self.guard.allow():
            return
        try:
            self.store.put(key, others + ([entry] if entry is not None else []))
        except Exception as e:
            self.guard.failed(e)
        else:
            self.guard.succeeded()

    def _invalidate(self, request: Request, response: Response) -> None:
        keys = {self._key(request)}
        host = request.headers.get("Host", "").lower()
        for name in ("Location", "Content-Location"):
            target = response.header(name)
            if target and target.startswith("/"):
                keys.add(f"{request.scheme}://{host}{target}")
        if not self.guard.allow():
            return
        try:
            for key in keys:
                self.store.delete(key)
        except Exception as e:
            self.guard.failed(e)
        else:
            self.guard.succeeded()

    def _finish(self, key: str, leader: bool) -> None:
        if leader:
            lock = self.held.pop(key, None)
            if lock is not None:
                try:
                    lock.release()
                except Exception as e:  # Redis gone: its lock expires by itself
                    self.guard.failed(e)
            event = self.inflight.pop(key, None)
            if event is not None:
                event.set()


def open_store(config: CacheConfig):
    """The store `config` names: memory, a directory, or Redis."""
    retention = Retention(config.stale_keep, every=bool(config.use_stale))
    if config.storage == "memory://":
        return MemoryStore(config.max_size, retention)
    if config.storage.startswith("file://"):
        return DiskStore(config.storage[len("file://"):], config.max_size, retention)
    return RedisStore(config.storage, config.storage_timeout, retention)


def cache_key(request: Request) -> str:
    """Where a response to `request` is stored: scheme, Host in lower case and
    the canonical target (target.py), as forwarded; the variants a Vary
    names live under one key."""
    return f"{request.scheme}://{request.headers.get('Host', '').lower()}{request.target}"


def _body(request: Request, entry: Entry):
    """A stored body as the WSGI server gets it. One read from its file goes
    through the server's file wrapper (PEP 3333), which gunicorn sends with
    sendfile over plain HTTP/1.x (server/response_writer.py) and reads in
    chunks over TLS and HTTP/2. The server sends Content-Length bytes from
    the file's position: without a matching Content-Length it would send to
    the file's end, so such a body is streamed in chunks by the proxy."""
    body = entry.body
    if not isinstance(body, FileBody):
        return [body]
    wrapper = request.environ.get("wsgi.file_wrapper")
    if wrapper is None or entry.derived().fields.get("content-length") != str(body.length):
        return body
    return wrapper(body.as_file(), CHUNK)


def _length(headers: list[tuple[str, str]]) -> int | None:
    """The body's length as Content-Length gives it, if it does, once."""
    given = header(headers, "Content-Length") or ""
    return int(given) if given.isascii() and given.isdigit() else None


def _count(request: Request, label: str, hit_bytes: int = 0) -> None:
    request.record.cache = label
    counters = metrics.get()
    if counters is not None:
        counters.cache.labels(label).inc()
        if hit_bytes:
            counters.cache_bytes.inc(hit_bytes)


def _tag(request: Request, response: Response, label: str, status: str) -> Response:
    _count(request, label)
    # Surrogate-Control is for this cache only (it is the gateway's own).
    response.headers = [(k, v) for k, v in response.headers if k.lower() != "surrogate-control"]
    # Cache-Status lists caches from the origin's side: ours comes last.
    response.headers += [("X-Cache", label), ("Cache-Status", f"{CACHE_STATUS}; {status}")]
    return response


def make(config: CacheConfig, shared: dict) -> HTTPCache:
    return HTTPCache(config, shared)
