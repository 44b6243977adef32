"""The admin listener (`[admin] bind`): /metrics for Prometheus, /healthz
and /readyz for load balancers and orchestrators, /status (a self-contained
live page), /status.json (what the page draws) and /status/live (the same,
pushed over a WebSocket: status_feed.py), and POST /purge, which removes
stored responses from the shared caches (disk, Redis) by url=, prefix= or
tag= (httpcache/purge.py), in the query or a form body.

Requests are told apart by the listener they arrived on, never by anything
the client sends, so no route can reach these pages and the admin listener
serves nothing else.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from rproxy.httpcache.purge import parse_request
from rproxy.messages import Response, error_response
from rproxy.observability import metrics
from rproxy.observability.status_feed import StatusFeed
from rproxy.observability.status_page import PAGE
from rproxy.storage_guard import redacted
from rproxy.tls import acme_cache

if TYPE_CHECKING:
    from rproxy.config import Config
    from rproxy.upstreams.servers import Upstream


class Admin:
    def __init__(self, config: Config, upstreams: dict[str, Upstream] | None = None) -> None:
        self.config = config
        self.upstreams = upstreams or {}
        self.feed = StatusFeed(self.status)
        self.purge_stores: dict | None = None  # cache name -> its store, opened at the first purge

    def __call__(self, environ: dict[str, Any]) -> Response:
        path = environ.get("PATH_INFO", "/")
        if path == "/purge":
            if environ.get("REQUEST_METHOD") != "POST":
                return error_response(None, 405, "purge with POST /purge and url=, prefix= or tag=",
                                      environ=environ)
            return self.purge(environ)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return error_response(None, 405, "the admin listener only answers GET", environ=environ)
        if path == "/healthz":
            return _answer(b"ok\n", "text/plain; charset=utf-8")
        if path == "/readyz":
            ready = self.readiness()
            return _answer(json.dumps(ready).encode() + b"\n", "application/json",
                           200 if ready["ready"] else 503)
        if path == "/metrics":
            if not metrics.enabled():
                return error_response(None, 503, "metrics are off", environ=environ)
            body, content_type = metrics.render()
            return _answer(body, content_type)
        if path in ("/", "/status"):
            return _answer(PAGE.encode(), "text/html; charset=utf-8")
        if path == "/status.json":
            return _answer(json.dumps(self.status()).encode(), "application/json")
        if path == "/status/live":
            return self.feed.open(environ)
        return error_response(None, 404, "not an admin page", environ=environ)

    def readiness(self) -> dict:
        """Can this proxy take traffic? The worker answering says its config
        is loaded; the master's count of workers (their metric files, which
        it removes as it reaps them) says they are all up; each upstream
        needs a server in rotation as this worker sees it (passive and
        active health); each [acme] domain needs a valid certificate. In
        memory, one directory listing and one small file per ACME domain: cheap."""
        reasons = []
        now = time.monotonic()
        upstreams = {}
        for name, upstream in self.upstreams.items():
            in_rotation = sum(1 for s in upstream.servers if s.available(now))
            upstreams[name] = {"servers": len(upstream.servers), "in_rotation": in_rotation}
            if not in_rotation:
                reasons.append(f"upstream {name}: no server in rotation")
        # A configured ACME domain still on the placeholder is not served properly.
        reasons.extend(acme_cache.certificate_problems(self.config.acme))
        expected = self.config.server.workers
        up = metrics.live_workers()
        if up is not None and up < expected:
            reasons.append(f"workers: {up} of {expected} up")
        return {"ready": not reasons, "reasons": reasons, "config": self.config.path, "pid": os.getpid(),
                "workers": {"up": up, "configured": expected}, "upstreams": upstreams}

    def purge(self, environ) -> Response:
        """Removes what url=, prefix= or tag= names from every shared cache.
        A memory:// cache is each worker's own, out of this worker's reach
        for the others: it is named in the answer, not purged."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= PURGE_BODY_MAX:
            return error_response(None, 413 if length > 0 else 400, "a purge's form body is a few fields",
                                  environ=environ)
        form = environ["wsgi.input"].read(length).decode("utf-8", "replace") if length else ""
        try:
            kind, value = parse_request(environ.get("QUERY_STRING", ""), form)
        except ValueError as e:
            return error_response(None, 400, str(e), environ=environ)
        from rproxy.middleware.cache import open_store
        caches = self.config.middleware.get("cache", {})
        if self.purge_stores is None:
            self.purge_stores = {name: open_store(c) for name, c in caches.items() if c.storage != "memory://"}
        if not self.purge_stores:
            return error_response(None, 409, "no cache to purge: memory:// caches are each worker's own; "
                                  "purge needs storage = file:///dir or redis://", environ=environ)
        purged: dict[str, int] = {}
        for name, store in self.purge_stores.items():
            try:
                purged[name] = (store.delete(value) if kind == "url" else
                                store.purge_prefix(value) if kind == "prefix" else store.purge_tag(value))
            except Exception as e:  # Redis down or slow, a directory gone
                return error_response(None, 503, f"cache {name or '[cache]'} ({redacted(caches[name].storage)}): "
                                      f"purge failed: {e}", environ=environ)
        counters = metrics.get()
        if counters is not None:
            counters.cache_purges.labels(kind).inc()
            counters.cache_purged.inc(sum(purged.values()))
        answer = {kind: value, "purged": sum(purged.values()),
                  "caches": {name or "cache": n for name, n in purged.items()},
                  "not_purged": sorted(name or "cache" for name in caches if name not in self.purge_stores)}
        return _answer(json.dumps(answer).encode() + b"\n", "application/json")

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

    def shutdown(self) -> None:
        """The worker stops: live feeds say going away."""
        self.feed.going_away()


PURGE_BODY_MAX = 16 * 1024


def _answer(body: bytes, content_type: str, status: int = 200) -> Response:
    return Response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                             ("Cache-Control", "no-store")], [body])
