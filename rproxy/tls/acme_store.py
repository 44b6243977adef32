"""ACME state shared by a fleet in Redis (`[acme] storage = redis://...`).

Several instances behind one load balancer share one account, one set of
certificates, one issuance lock and the pending challenge answers, so that
one instance orders a certificate and any instance answers the CA's
validation. Kept in Redis, under keys sharing one hash tag (one cluster slot):

    {rproxy:acme:ISSUER}:account.key    the account key (PEM)
    {rproxy:acme:ISSUER}:certificates   hash: domain -> key + chain (PEM)
    {rproxy:acme:ISSUER}:challenges     hash: http-01/TOKEN -> key authorization,
                                        tls-alpn-01/DOMAIN -> challenge certificate
    {rproxy:acme:ISSUER}:generation     bumped on every change of the two hashes
    {rproxy:acme:ISSUER}:lock           the issuance lease: SET NX PX with an owner
                                        token, renewed by its owner, deleted only by it

Every instance mirrors the two hashes into its own cache_dir (one GET of the
generation per poll, the hashes only when it moved), so the files that the
TLS listeners and the HTTP-01 answer already read stay the only thing the
request path looks at, and a Redis outage never takes a served certificate
away.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Callable

from rproxy.httpcache import redis_uri
from rproxy.storage_guard import redacted
from rproxy.tls import certificates

log = logging.getLogger("rproxy.acme")

# How long a lease lasts unless renewed: how soon another instance takes
# over from one that died holding it.
LEASE = 30.0
# Redis commands give up after this long: a hung Redis stalls no order for long.
TIMEOUT = 3.0
# How often each instance looks for what changed in the store (one GET), and
# so how soon it copies a new certificate or challenge into its cache_dir.
MIRROR_POLL = 1.0
# Challenge answers outlive any order (ORDER_TIMEOUT) but not a crashed manager for long.
CHALLENGE_TTL = 600

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class RedisStore:
    """One issuer's shared ACME state; every method may raise redis errors."""

    def __init__(self, uri: str, issuer: str, timeout: float = TIMEOUT):
        self.where = redacted(uri)  # for logs
        self.client = redis_uri.client(uri, timeout)
        prefix = f"{{rproxy:acme:{issuer}}}"
        self.account_key_key = f"{prefix}:account.key"
        self.certificates_key = f"{prefix}:certificates"
        self.challenges_key = f"{prefix}:challenges"
        self.generation_key = f"{prefix}:generation"
        self.lock_key = f"{prefix}:lock"
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(8)}"
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    # -- the issuance lease ---------------------------------------------------

    def acquire(self) -> bool:
        return bool(self.client.set(self.lock_key, self.owner, nx=True, px=int(LEASE * 1000)))

    def renew(self) -> bool:
        """False: the lease expired and is someone else's (or no one's) now."""
        return bool(self._renew(keys=[self.lock_key], args=[self.owner, int(LEASE * 1000)]))

    def release(self) -> None:
        self._release(keys=[self.lock_key], args=[self.owner])

    # -- account and certificates ---------------------------------------------

    def account_key(self, new_pem: bytes) -> bytes:
        """The fleet's account key: the one stored, else `new_pem`, stored now."""
        self.client.set(self.account_key_key, new_pem, nx=True)
        return self.client.get(self.account_key_key)

    def put_certificate(self, domain: str, pem: bytes) -> None:
        with self.client.pipeline() as pipe:
            pipe.hset(self.certificates_key, domain, pem)
            pipe.incr(self.generation_key)
            pipe.execute()

    # -- challenges -------------------------------------------------------------

    def put_challenge(self, name: str, value: bytes) -> None:
        """`name` is http-01/TOKEN or tls-alpn-01/DOMAIN."""
        with self.client.pipeline() as pipe:
            pipe.hset(self.challenges_key, name, value)
            pipe.expire(self.challenges_key, CHALLENGE_TTL)
            pipe.incr(self.generation_key)
            pipe.execute()

    def remove_challenge(self, name: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.hdel(self.challenges_key, name)
            pipe.incr(self.generation_key)
            pipe.execute()

    def http01_answer(self, token: str) -> bytes | None:
        return self.client.hget(self.challenges_key, f"http-01/{token}")

    # -- the mirror -------------------------------------------------------------

    def generation(self) -> int:
        return int(self.client.get(self.generation_key) or 0)

    def snapshot(self) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(certificates by domain, challenges by name), read together."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.certificates_key)
            pipe.hgetall(self.challenges_key)
            certs, challenges = pipe.execute()
        return ({k.decode(): v for k, v in certs.items()}, {k.decode(): v for k, v in challenges.items()})


class Mirror:
    """Keeps one instance's cache_dir in step with the store."""

    def __init__(self, store: RedisStore, cache, domains: tuple[str, ...]):
        self.store, self.cache, self.domains = store, cache, domains
        self.seen: int | None = None
        self.mirrored: set[str] = set()  # challenge files this mirror wrote
        self.stored: set[str] = set()  # the domains with a certificate in the store
        self.newer_here: set[str] = set()  # the domains whose certificate here outlives the stored one

    def sync(self, force: bool = False) -> list[str]:
        """Copy what changed; the domains whose certificate was replaced."""
        generation = self.store.generation()
        if generation == self.seen and not force:
            return []
        certs, challenges = self.store.snapshot()
        replaced = []
        self.stored, self.newer_here = set(certs), set()
        for domain in self.domains:
            pem = certs.get(domain)
            path = self.cache.certificate(domain)
            if pem is None or _read(path) == pem:
                continue
            try:
                stored = certificates.parse_chain(pem, f"the stored certificate of {domain}")[0]
            except certificates.CertificateProblem:
                continue  # never replace a served certificate by a broken one
            try:
                local = certificates.load_chain(path)[0]
            except certificates.CertificateProblem:
                local = None
            # Never by an older one: this instance may have obtained its own while the store was down.
            if local is not None and local.not_valid_after_utc >= stored.not_valid_after_utc:
                self.newer_here.add(domain)
                continue
            certificates.write_private(path, pem)
            replaced.append(domain)
        wanted = {}
        for name, value in challenges.items():
            kind, _, key = name.partition("/")
            if kind == "http-01" and _safe(key):
                wanted[self.cache.challenge(key)] = (value, 0o644)
            elif kind == "tls-alpn-01" and _safe(key):
                wanted[self.cache.tls_alpn_certificate(key)] = (value, 0o600)
        for path, (value, mode) in wanted.items():
            if _read(path) != value:
                certificates.write_private(path, value, mode=mode)
        for path in self.mirrored - wanted.keys():
            try:
                os.unlink(path)
            except OSError:
                pass
        self.mirrored = set(wanted)
        self.seen = generation
        return replaced


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _safe(name: str) -> bool:
    """A file name that stays inside its directory."""
    return bool(name) and "/" not in name and name not in (".", "..") and not name.startswith(".")


class Lease:
    """The fleet's issuance lease, renewed while the manager works; `held()`
    turns False once it cannot be renewed (lost, or the store down until it
    would have expired), and the manager then stops."""

    def __init__(self, store: RedisStore, alive: Callable[[], bool]):
        self.store, self.alive = store, alive
        self.until = time.monotonic() + LEASE
        self.lost = False

    def held(self) -> bool:
        return self.alive() and not self.lost and time.monotonic() < self.until

    def keep(self) -> None:
        while self.held():
            time.sleep(LEASE / 3)
            started = time.monotonic()
            try:
                renewed = self.store.renew()
            except Exception as e:  # noqa: BLE001 - retried until the lease would have run out
                log.error("acme: cannot renew the issuance lease in %s (%s); stopping issuance in %.0fs "
                          "unless it can", self.store.where, e or type(e).__name__, self.until - time.monotonic())
                continue
            if not renewed:
                self.lost = True
                log.error("acme: lost the issuance lease in %s to another instance; stopping issuance",
                          self.store.where)
                return
            self.until = started + LEASE

    def release(self) -> None:
        try:
            self.store.release()
        except Exception:  # noqa: BLE001 - it expires by itself
            pass
