"""Middleware: blocking functions `(request, call_next) -> Response`.

A route's chain is composed once at start-up; per request it is plain nested
calls. Each middleware lives in its own module with its config.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Protocol, Sequence

from rproxy.messages import Request, Response
from rproxy.middleware import cache, filter, rate_limit, security_headers

Handler = Callable[[Request], Response]


class Middleware(Protocol):
    def __call__(self, request: Request, call_next: Handler) -> Response: ...


# kind -> (config class, factory), in chain order: security headers wrap the
# rest, so they reach every response, the 429s and 404s of the others too.
_KINDS: dict[str, tuple[type, Callable[[Any, dict[str, Any]], Middleware]]] = {
    "security_headers": (security_headers.SecurityHeadersConfig, security_headers.make),
    "rate_limit": (rate_limit.RateLimitConfig, rate_limit.make),
    "filter": (filter.FilterConfig, filter.make),
    "cache": (cache.CacheConfig, cache.make),
}
MIDDLEWARE: dict[str, type] = {kind: cls for kind, (cls, _) in _KINDS.items()}


def make(kind: str, config: Any, shared: dict) -> Middleware:
    """The middleware for a config section; `shared` holds what middlewares
    of one worker share (e.g. rate-limit storages)."""
    return _KINDS[kind][1](config, shared)


def compose(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """chain([a, b], h)(request) == a(request, b(., h)): the first runs first."""
    for middleware in reversed(middlewares):
        handler = partial(middleware, call_next=handler)
    return handler
