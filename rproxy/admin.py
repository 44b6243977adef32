"""The admin listener (`[admin] bind`): /metrics for Prometheus, /status (a
self-contained live page) and /status.json (what the page draws).

Requests are told apart by the listener they arrived on, never by anything
the client sends, so no route can reach these pages and the admin listener
serves nothing else.
"""

from __future__ import annotations

import json
import os
import time

from . import metrics
from .http import Response, error_response
from .status_page import PAGE


class Admin:
    def __init__(self, config):
        self.config = config

    def __call__(self, environ) -> Response:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return error_response(None, 405, "the admin listener only answers GET", environ=environ)
        if path == "/metrics":
            if not metrics.enabled():
                return error_response(None, 503, "metrics are off", environ=environ)
            body, content_type = metrics.render()
            return _answer(body, content_type)
        if path in ("/", "/status"):
            return _answer(PAGE.encode(), "text/html; charset=utf-8")
        if path == "/status.json":
            return _answer(json.dumps(self.status()).encode(), "application/json")
        return error_response(None, 404, "not an admin page", environ=environ)

    def status(self) -> dict:
        samples = metrics.snapshot() if metrics.enabled() else {}
        config = self.config
        return {
            "time": time.time(),
            "pid": os.getpid(),
            "routes": [{"name": r.name, "host": list(r.host), "path": r.path, "upstream": r.upstream}
                       for r in config.routes],
            "upstreams": {name: [str(s) for s in u.servers] for name, u in config.upstreams.items()},
            "samples": samples,
        }


def _answer(body: bytes, content_type: str) -> Response:
    return Response(200, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                          ("Cache-Control", "no-store")], [body])
