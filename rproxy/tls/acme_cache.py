"""What ACME keeps in cache_dir, and what is answered from it.

The layout of cache_dir (per ACME directory, so that staging certificates
never pass for production ones), the placeholder certificate made before the
workers start, the reasons /readyz gives for a domain without a valid
certificate, and the HTTP-01 answer for a request path: from the files, or
from a fleet's store for a token the mirror has not copied yet.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from rproxy.tls import acme_store, certificates
from rproxy.tls.certificates import CertificateProblem

if TYPE_CHECKING:
    from rproxy.config.sections import AcmeConfig
    from rproxy.storage_guard import StorageGuard

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")


class CacheDir:
    """The layout of cache_dir. Account and certificates are kept per ACME
    directory, so that staging certificates never pass for production ones."""

    def __init__(self, config: AcmeConfig) -> None:
        self.root = os.path.abspath(config.cache_dir)
        parts = urlsplit(config.directory)
        issuer = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{parts.netloc}{parts.path}").strip("-")
        self.issuer_name = issuer or "acme"
        self.issuer = os.path.join(self.root, self.issuer_name)
        self.account_key = os.path.join(self.issuer, "account.key")
        self.certificates = os.path.join(self.issuer, "certificates")
        self.challenges = os.path.join(self.root, "challenges")
        self.tls_alpn = os.path.join(self.root, "tls-alpn-01")
        self.lock = os.path.join(self.root, "lock")
        self.placeholder = os.path.join(self.root, "placeholder.pem")

    def certificate(self, domain: str) -> str:
        """The certificate chain of `domain` with its private key, in one file."""
        return os.path.join(self.certificates, f"{domain}.pem")

    def challenge(self, token: str) -> str:
        return os.path.join(self.challenges, token)

    def tls_alpn_certificate(self, domain: str) -> str:
        return os.path.join(self.tls_alpn, f"{domain}.pem")

    def prepare(self) -> None:
        for path in (self.root, self.issuer, self.certificates, self.challenges, self.tls_alpn):
            os.makedirs(path, mode=0o700, exist_ok=True)


def prepare(config) -> None:
    """In the master, before the workers start: cache_dir exists, and a
    placeholder certificate covers the domains until theirs are issued."""
    cache = CacheDir(config.acme)
    cache.prepare()
    certificates.write_placeholder(cache.placeholder, config.acme.domains)


def certificate_problems(config, now: float | None = None) -> list[str]:
    """Why a configured domain has no valid certificate (it is served the
    placeholder): one reason per domain, for /readyz."""
    if not config.domains:
        return []
    cache, now = CacheDir(config), time.time() if now is None else now
    problems = []
    for domain in config.domains:
        try:
            leaf = certificates.load_chain(cache.certificate(domain))[0]
        except CertificateProblem:
            leaf = None
        if leaf is None or domain not in certificates.names_of(leaf):
            problems.append(f"certificate {domain}: none valid")
        elif leaf.not_valid_after_utc.timestamp() <= now:
            problems.append(f"certificate {domain}: expired since {when(leaf.not_valid_after_utc.timestamp())}")
    return problems


def challenge_answer(cache: CacheDir, path: str, store: acme_store.RedisStore | None = None,
                     guard: StorageGuard | None = None) -> bytes | None:
    """The key authorization for an HTTP-01 request path, if one is pending:
    in cache_dir, else (a challenge this instance's mirror has not copied
    yet) in the fleet's store, unless `guard` (a StorageGuard) leaves it
    alone after a failure."""
    token = path[len(CHALLENGE_PREFIX):]
    if not _TOKEN_RE.fullmatch(token):
        return None
    try:
        with open(cache.challenge(token), "rb") as f:
            return f.read()
    except OSError:
        pass
    if store is None or guard is None or not guard.allow():  # a store goes with its guard
        return None
    try:
        answer = store.http01_answer(token)
    except Exception as e:  # noqa: BLE001 - no answer is the answer when the store fails
        guard.failed(e)
        return None
    guard.succeeded()
    return answer


def shared_store(config: AcmeConfig, timeout: float = acme_store.TIMEOUT) -> acme_store.RedisStore | None:
    """The fleet's shared store for `[acme] storage`, or None (cache_dir alone)."""
    if not config.storage:
        return None
    return acme_store.RedisStore(config.storage, CacheDir(config).issuer_name, timeout)


def when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
