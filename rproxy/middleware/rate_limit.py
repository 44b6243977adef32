"""Rate limiting with the `limits` package: first in every chain.

Limits like `100/minute; 10/second`, counted per client IP (the real one,
behind trusted proxies) or per header value, with the moving-window,
fixed-window or sliding-window-counter strategy. Counts live in this worker
(`memory://`) or in Redis (`redis://...`), shared by every worker and every
rproxy that uses the same Redis. Over the limit: 429 with Retry-After;
RateLimit-Limit/-Remaining/-Reset on allowed responses too (`headers = yes`).
When the storage fails, requests are let through (or refused, with
`on_storage_error = deny`), logged once per outage, and the storage is left
alone for `storage_retry` (storage_guard.py), so that requests do not each
wait for a hung Redis; counting resumes by itself when the storage is back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import parse_many, strategies
from limits.storage import storage_from_string

from rproxy.messages import Request, Response, error_response, header_environ_key
from rproxy.observability import metrics
from rproxy.storage_guard import StorageGuard
from rproxy.values import boolean, limit_key, limits, one_of, positive_duration, setting, storage_uri

STRATEGIES: dict[str, type[strategies.RateLimiter]] = {
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
                           "memory:// (per worker) or redis://host:port/db (shared); also "
                           "rediss://, redis+sentinel://host:port/service, redis+cluster://host:port,host:port.")
    storage_timeout: float = setting("500ms", positive_duration, "Longest wait for the storage.")
    on_storage_error: str = setting("allow", one_of("allow", "deny"),
                                    "When the storage fails: allow requests, or deny them (503).")
    storage_retry: float = setting("5s", positive_duration,
                                   "After the storage fails or times out, how long it is left alone "
                                   "(on_storage_error applies at once); then one request tries it again.")
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
        self.deny = config.on_storage_error == "deny"
        self.guard = StorageGuard(f"rate_limit:{config.name}", config.storage, config.storage_retry,
                                  "denying requests" if self.deny else "allowing requests", "; counting again")
        self.metrics = metrics.get()

    def __call__(self, request: Request, call_next) -> Response:
        key = request.environ.get(self.header_key) if self.header_key else None
        key = f"h:{key}" if key else f"ip:{request.client_ip}"
        if not self.guard.allow():
            return self._without_storage(request, call_next)
        try:
            allowed, limit, remaining, reset = self._hit(key)
        except Exception as e:  # the storage failed: Redis down, timed out, ...
            self.guard.failed(e)
            return self._without_storage(request, call_next)
        self.guard.succeeded()
        headers = [("RateLimit-Limit", str(limit)), ("RateLimit-Remaining", str(remaining)),
                   ("RateLimit-Reset", str(reset))]
        if not allowed:
            request.record.error = "rate limited"
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
        assert worst is not None  # parse_many gives at least one limit
        remaining, reset, amount = worst
        return allowed, amount, max(0, remaining), reset

    def _without_storage(self, request: Request, call_next) -> Response:
        if self.deny:
            request.record.error = "rate limit storage unavailable"
            return error_response(request, 503, "rate limiting is unavailable",
                                  [("Retry-After", str(self.guard.retry_after()))])
        return call_next(request)


def make(config: RateLimitConfig, shared: dict) -> RateLimiter:
    return RateLimiter(config, shared)
