"""Where cached responses live: an LRU in the worker's memory, or Redis,
shared by every worker and instance. A key holds the variants (Vary) of one
URL; both stores bound the total size, and Redis expires keys by itself.
The disk store (disk.py) shares one directory between a host's workers.
Every store purges (purge.py) by key, key prefix and tag: Redis keeps a set
of keys per tag, expiring with the longest-lived of them.
`lock(key, expiry)` (disk and Redis) is how one worker of a host, or of the
whole fleet, fetches a missing URL while the others wait for it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections import OrderedDict

from rproxy.httpcache.purge import entries_tags
from rproxy.httpcache.redis_uri import client as redis_client
from rproxy.httpcache.rules import Entry
from rproxy.httpcache.stale import kept_stale


def _encode(entries: list[Entry]) -> bytes:
    meta = [{"status": e.status, "reason": e.reason, "headers": e.headers, "request_time": e.request_time,
             "response_time": e.response_time, "vary": e.vary, "size": len(e.body)} for e in entries]
    head = json.dumps(meta).encode()
    # Only the disk store's entries hold a FileBody; this store's hold bytes.
    return len(head).to_bytes(4, "big") + head + b"".join(e.body for e in entries)  # type: ignore[misc]


def _decode(blob: bytes) -> list[Entry]:
    size = int.from_bytes(blob[:4], "big")
    meta = json.loads(blob[4:4 + size])
    pos, entries = 4 + size, []
    for m in meta:
        body = blob[pos:pos + m["size"]]
        pos += m["size"]
        entries.append(Entry(m["status"], m["reason"], [tuple(h) for h in m["headers"]], body,
                             m["request_time"], m["response_time"], m["vary"]))
    return entries


class Retention:
    """How long past freshness stale entries are kept: `stale_keep` for
    those with validators (to revalidate them), for all when `every` (the
    use_stale switch may serve them), and as long as their own
    stale-while-revalidate / stale-if-error may use them."""

    __slots__ = ("stale_keep", "every")

    def __init__(self, stale_keep: float = 3600.0, every: bool = False):
        self.stale_keep, self.every = stale_keep, every

    def keep_for(self, entries: list[Entry]) -> float:
        """How long a key is worth keeping from now; <= 0: not at all."""
        best = 0.0
        for entry in entries:
            extra = self.stale_keep if self.every or entry.validators() else 0.0
            left = entry.freshness_lifetime() - entry.age() + max(extra, kept_stale(entry))
            best = max(best, left)
        return best


class MemoryStore:
    def __init__(self, max_size: int, retention: Retention | None = None):
        self.max_size = max_size
        self.retention = retention or Retention()
        self.size = 0
        self.items: OrderedDict[str, list[Entry]] = OrderedDict()

    def get(self, key: str) -> list[Entry]:
        entries = self.items.get(key)
        if entries is None:
            return []
        self.items.move_to_end(key)
        return list(entries)

    def put(self, key: str, entries: list[Entry]) -> None:
        self.delete(key)
        if not entries or self.retention.keep_for(entries) <= 0:
            return
        size = sum(e.size for e in entries)
        if size > self.max_size:
            return
        self.items[key] = entries
        self.size += size
        while self.size > self.max_size:
            _, evicted = self.items.popitem(last=False)
            self.size -= sum(e.size for e in evicted)

    def delete(self, key: str) -> int:
        old = self.items.pop(key, None)
        if old is not None:
            self.size -= sum(e.size for e in old)
        return int(old is not None)

    def purge_prefix(self, prefix: str) -> int:
        return sum(self.delete(key) for key in [k for k in self.items if k.startswith(prefix)])

    def purge_tag(self, tag: str) -> int:
        return sum(self.delete(key) for key in [k for k, e in self.items.items() if tag in entries_tags(e)])


class RedisStore:
    def __init__(self, url: str, timeout: float, retention: Retention | None = None):
        self.retention = retention or Retention()
        self.redis = redis_client(url, timeout)
        self.prefix = "rproxy:cache:"
        self.tag_prefix = "rproxy:cachetag:"  # not under prefix: a prefix purge's SCAN never meets them

    def get(self, key: str) -> list[Entry]:
        blob = self.redis.get(self.prefix + key)
        return _decode(blob) if blob else []

    def put(self, key: str, entries: list[Entry]) -> None:
        ttl = self.retention.keep_for(entries)
        if not entries or ttl <= 0:
            self.delete(key)
            return
        px = max(1, int(ttl * 1000))
        tags = entries_tags(entries)
        if not tags:
            self.redis.set(self.prefix + key, _encode(entries), px=px)
            return
        pipe = self.redis.pipeline(transaction=False)  # tag sets may live on other cluster nodes
        pipe.set(self.prefix + key, _encode(entries), px=px)
        for tag in tags:
            name = self.tag_prefix + tag
            pipe.sadd(name, key)
            # A new set gets this expiry; an older one keeps the longer of the two.
            pipe.pexpire(name, px, nx=True)
            pipe.pexpire(name, px, gt=True)
        pipe.execute()

    def delete(self, key: str) -> int:
        return int(self.redis.delete(self.prefix + key))

    def purge_prefix(self, prefix: str) -> int:
        pattern = self.prefix + re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        purged = 0
        for name in self.redis.scan_iter(match=pattern, count=500):
            purged += int(self.redis.delete(name))
        return purged

    def purge_tag(self, tag: str) -> int:
        name = self.tag_prefix + tag
        keys = self.redis.smembers(name)
        self.redis.delete(name)
        return sum(self.delete(k.decode()) for k in keys)

    def lock(self, key: str, expiry: float) -> RedisLock:
        return RedisLock(self.redis, self.prefix + "lock:" + key, expiry)


class RedisLock:
    """An exclusive lock on one key across every instance: a Redis key set
    if absent, which expires after `expiry` should its holder die.
    `acquire()` never waits: it says whether it got the lock."""

    # Deletes the lock only if it is still ours: after the expiry another
    # worker may hold it.
    RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    __slots__ = ("redis", "name", "expiry", "token")

    def __init__(self, redis, name: str, expiry: float):
        self.redis, self.name, self.expiry = redis, name, expiry
        self.token = secrets.token_hex(8)

    def acquire(self) -> bool:
        return bool(self.redis.set(self.name, self.token, nx=True, px=max(1, int(self.expiry * 1000))))

    def release(self) -> None:
        self.redis.eval(self.RELEASE, 1, self.name, self.token)
