"""Rate limiting with the `limits` package: first in every chain.

Limits like `100/minute; 10/second`, counted per client IP (the real one,
behind trusted proxies) or per header value, with the moving-window,
fixed-window or sliding-window-counter strategy. Counts live in this worker
(`memory://`) or in Redis (`redis://...`), shared by every worker and every
rproxy that uses the same Redis. Over the limit: 429 with Retry-After;
RateLimit-Limit/-Remaining/-Reset on allowed responses too (`headers = yes`).
When the storage fails, requests are let through (or refused, with
`on_storage_error = deny`), logged once per outage; counting resumes by
itself when the storage is back.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import parse_many, strategies
from limits.storage import storage_from_string

from .. import metrics
from ..http import Request, Response, error_response, header_environ_key
from ..values import boolean, limit_key, limits, one_of, positive_duration, setting, storage_uri

log = logging.getLogger("rproxy.rate_limit")

STRATEGIES = {
    "moving-window": strategies.MovingWindowRateLimiter,
    "fixed-window": strategies.FixedWindowRateLimiter,
    "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter,
}


@dataclass(frozen=True)
class RateLimitConfig:
    name: str
    limit: str = setting(None, limits, "Limits, e.g. 100/minute; 10/second.", required=True)
    key: str = setting("ip", limit_key, "What is counted: ip (the real client) or header:NAME "
                                        "(requests without it count by ip).")
    strategy: str = setting("moving-window", one_of(*STRATEGIES),
                            "moving-window, fixed-window or sliding-window-counter.")
    storage: str = setting("memory://", storage_uri,
                           "memory:// (per worker) or redis://host:port/db (shared).")
    storage_timeout: float = setting("500ms", positive_duration, "Longest wait for the storage.")
    on_storage_error: str = setting("allow", one_of("allow", "deny"),
                                    "When the storage fails: allow requests, or deny them (503).")
    headers: bool = setting("yes", boolean, "RateLimit-* headers on allowed responses too.")


def storage_for(config: RateLimitConfig, shared: dict):
    """One storage per URI and worker, shared by the limits that use it."""
    storages = shared.setdefault("rate_limit_storages", {})
    storage = storages.get(config.storage)
    if storage is None:
        options = {}
        if config.storage.startswith("redis"):
            options = {"socket_timeout": config.storage_timeout,
                       "socket_connect_timeout": config.storage_timeout}
        storage = storages[config.storage] = storage_from_string(config.storage, **options)
    return storage


class RateLimiter:
    def __init__(self, config: RateLimitConfig, shared: dict):
        self.config = config
        self.limiter = STRATEGIES[config.strategy](storage_for(config, shared))
        self.items = parse_many(config.limit)
        header = config.key[len("header:"):] if config.key.startswith("header:") else None
        self.header_key = header_environ_key(header) if header else None
        self.namespace = f"rproxy:{config.name}"
        self.outage = False
        self.metrics = metrics.get()

    def __call__(self, request: Request, call_next) -> Response:
        key = request.environ.get(self.header_key) if self.header_key else None
        key = f"h:{key}" if key else f"ip:{request.client_ip}"
        try:
            allowed, limit, remaining, reset = self._hit(key)
        except Exception as e:  # the storage failed: Redis down, timed out, ...
            return self._storage_failed(request, call_next, e)
        if self.outage:
            self.outage = False
            log.warning("[rate_limit:%s] storage %s is back; counting again", self.config.name,
                        self.config.storage)
        headers = [("RateLimit-Limit", str(limit)), ("RateLimit-Remaining", str(remaining)),
                   ("RateLimit-Reset", str(reset))]
        if not allowed:
            request.environ["rproxy.error"] = "rate limited"
            if self.metrics is not None:
                self.metrics.rate_limited.labels(self.config.name).inc()
            return error_response(request, 429, "too many requests", [("Retry-After", str(reset)), *headers])
        response = call_next(request)
        if self.config.headers:
            response.headers.extend(headers)
        return response

    def _hit(self, key: str) -> tuple[bool, int, int, int]:
        """Count the request against every limit; the tightest one speaks."""
        allowed, worst = True, None
        now = time.time()
        for item in self.items:
            if not self.limiter.hit(item, self.namespace, key):
                allowed = False
            stats = self.limiter.get_window_stats(item, self.namespace, key)
            candidate = (stats.remaining, max(0, math.ceil(stats.reset_time - now)), item.amount)
            if worst is None or candidate[0] < worst[0]:
                worst = candidate
        remaining, reset, amount = worst
        return allowed, amount, max(0, remaining), reset

    def _storage_failed(self, request: Request, call_next, error: Exception) -> Response:
        if not self.outage:
            self.outage = True
            log.error("[rate_limit:%s] storage %s failed (%s); %s requests until it is back",
                      self.config.name, self.config.storage, error,
                      "denying" if self.config.on_storage_error == "deny" else "allowing")
        if self.config.on_storage_error == "deny":
            return error_response(request, 503, "rate limiting is unavailable", [("Retry-After", "1")])
        return call_next(request)


def make(config: RateLimitConfig, shared: dict) -> RateLimiter:
    return RateLimiter(config, shared)
