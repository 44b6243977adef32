"""Middleware: blocking functions `(request, call_next) -> Response`.

A route's chain is composed once at start-up; per request it is plain nested
calls. Each middleware lives in its own module with its config.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

from ..http import Request, Response

Handler = Callable[[Request], Response]
Middleware = Callable[[Request, Handler], Response]


def compose(middlewares: Sequence[Middleware], handler: Handler) -> Handler:
    """chain([a, b], h)(request) == a(request, b(., h)): the first runs first."""
    for middleware in reversed(middlewares):
        handler = partial(middleware, call_next=handler)
    return handler
