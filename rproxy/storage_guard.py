"""A middleware's storage (Redis) behind a circuit breaker (breaker.py).

While Redis is down or hangs, each call would wait up to `storage_timeout`;
every request would pay it. After one failure or timeout the storage is left
alone for `storage_retry` instead: requests go on at once under the
middleware's own policy (the rate limit lets them through or refuses them,
the cache is bypassed); then one request tries the storage again. The log
says it once when the storage fails and once when it is back; the metrics
count the failures, the requests that went without it, and whether it is
down.
"""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import urlsplit

from rproxy.observability import metrics
from rproxy.upstreams.breaker import Breaker

log = logging.getLogger("rproxy.storage")


def redacted(uri: str) -> str:
    """The storage URI without its credentials, for logs."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class StorageGuard:
    """`allow()` before using the storage; then `succeeded()` or `failed(error)`."""

    __slots__ = ("user", "where", "while_down", "when_back", "breaker", "down", "errors", "skipped", "gauge")

    def __init__(self, user: str, uri: str, retry: float, while_down: str, when_back: str = ""):
        self.user = user              # "rate_limit:api", "cache:default"
        self.where = redacted(uri)
        self.while_down = while_down  # what requests get meanwhile, for the log
        self.when_back = when_back
        self.breaker = Breaker(threshold=1, window=retry, backoff=retry)
        self.down = False             # the outage was logged
        counters = metrics.get()
        if counters is not None:
            self.errors = counters.storage_errors.labels(user)
            self.skipped = counters.storage_skipped.labels(user)
            self.gauge = counters.storage_down.labels(user)
            self.gauge.set(0)
        else:
            self.errors = self.skipped = self.gauge = None

    def allow(self) -> bool:
        """May this request use the storage? No while it is left alone."""
        if not self.breaker.until or self.breaker.allow(time.monotonic()):
            return True
        if self.skipped is not None:
            self.skipped.inc()
        return False

    def retry_after(self) -> int:
        """Whole seconds until the storage is tried again (at least 1)."""
        return max(1, math.ceil(self.breaker.retry_in(time.monotonic())))

    def failed(self, error: Exception) -> None:
        if self.errors is not None:
            self.errors.inc()
        if not self.breaker.failed(time.monotonic()) or self.down:
            return
        self.down = True
        if self.gauge is not None:
            self.gauge.set(1)
        log.error("[%s] storage %s failed (%s); %s until it is back, trying it again every %gs",
                  self.user, self.where, error or type(error).__name__, self.while_down,
                  self.breaker.backoff)

    def succeeded(self) -> None:
        if self.breaker.until:
            self.breaker.succeeded()
        if self.down:
            self.down = False
            if self.gauge is not None:
                self.gauge.set(0)
            log.warning("[%s] storage %s is back%s", self.user, self.where, self.when_back)
