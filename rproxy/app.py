"""The WSGI application gunicorn serves: `rproxy.app:application`.

Built once per worker from the INI: the router, and for each route its
middleware chain ending in the forwarder. Per request: build the Request,
settle who the client is, match a route, run its chain, hand the Response to
the WSGI server.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Iterable

from gevent import monkey

from rproxy import config as config_module
from rproxy import middleware
from rproxy.client_address import Forwarding
from rproxy.config import Config
from rproxy.config.addresses import host_port
from rproxy.forwarding.forwarder import Forwarder
from rproxy.forwarding.tunnel import Tunnels
from rproxy.messages import BadRequest, Request, Response, error_response
from rproxy.middleware import compose
from rproxy.middleware.security_headers import SecurityHeaders
from rproxy.observability import metrics
from rproxy.observability.admin import Admin
from rproxy.record import KEY as RECORD
from rproxy.record import RequestRecord
from rproxy.routing import Router
from rproxy.server.lingering_close import LingeringClose
from rproxy.server.plain_http import PlainHttp
from rproxy.server.settings import serving_config
from rproxy.server.takeover import TAKEN_OVER
from rproxy.upstreams.servers import Upstream

if TYPE_CHECKING:
    from wsgiref.types import StartResponse

    from rproxy.config.sections import RouteConfig
    from rproxy.middleware import Handler

log = logging.getLogger("rproxy")


class Route:
    """A configured route with its composed handler."""

    __slots__ = ("config", "name", "handler")

    def __init__(self, route_config: RouteConfig, handler: Handler) -> None:
        self.config = route_config
        self.name = route_config.name
        self.handler = handler


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.forwarding = Forwarding(config.server.trusted_proxies, config.server.spoofable_headers)
        self.upstreams = {name: Upstream(cfg) for name, cfg in config.upstreams.items()}
        self.tunnels = Tunnels(config.server.max_tunnels)
        shared: dict[str, Any] = {}
        entries = []
        for rc in config.routes:
            forwarder = Forwarder(rc, self.upstreams[rc.upstream], config.server,
                                  self.tunnels)
            chain = [middleware.make(kind, section, shared) for kind, section in config.chain_for(rc)]
            entries.append((rc.host, rc.path, Route(rc, compose(chain, forwarder))))
        self.metrics = metrics.get()
        self.admin = Admin(config, self.upstreams)
        self.admin_address: tuple[str, str] | None = None
        if config.admin.bind:
            host, port = host_port(config.admin.bind)
            self.admin_address = (host, str(port))
        # The proxy's own answers outside any route (400, 404) get the global security headers.
        headers_config = config.middleware["security_headers"].get("")
        self.security_headers = SecurityHeaders(headers_config) if headers_config else None
        self.router: Router[Route] = Router(entries)
        self.plain_http = PlainHttp(config, self.forwarding) if config.tls else None
        if monkey.is_module_patched("socket"):  # in a gevent worker: start health checks
            for upstream in self.upstreams.values():
                upstream.start()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if self.admin_address is not None and (environ.get("SERVER_NAME"), environ.get("SERVER_PORT")) \
                == self.admin_address:
            response = self.admin(environ)
        else:
            environ[RECORD] = record = RequestRecord()
            if self.metrics is not None:
                self.metrics.in_flight.inc()
                record.in_flight = True
            if self.plain_http is not None:
                self.plain_http.set_scheme(environ)
            response = self.respond(environ, record)
        body = response.body
        if body is TAKEN_OVER:
            # A tunnel owns the connection now: the worker ends gunicorn's
            # handling of it without a write (server/takeover.py).
            taken: RequestRecord | None = environ.get(RECORD)  # none for the admin's live status feed
            if taken is not None:
                taken.taken_over = True
                if taken.in_flight and self.metrics is not None:
                    taken.in_flight = False
                    self.metrics.in_flight.dec()
            return TAKEN_OVER
        # Interim answers (103) go out while the upstream's head is awaited,
        # never once the final one is here: gunicorn's callback, a closure
        # over its request, socket and response, is let go rather than kept
        # for as long as the body streams (a held event stream: hours).
        environ.pop("wsgi.early_hints", None)
        if response.close_connection:
            body = LingeringClose(body, environ)
        # The upstream's Date and Server stay for the cache's sake up to here:
        # the writer (server/response_writer.py) keeps the Date, and writes
        # its own Server.
        start_response(response.status_line, response.headers)
        return body

    def respond(self, environ: dict[str, Any], record: RequestRecord) -> Response:
        try:
            request = Request.from_environ(environ)
        except BadRequest as e:
            refusal = error_response(None, e.status, str(e), environ=environ)
            refusal.close_connection = True
            if self.security_headers is not None:
                self.security_headers.decorate(refusal, environ.get("wsgi.url_scheme") == "https")
            return refusal
        self.forwarding.apply(request)
        record.client = request.client_ip
        record.request_id = request.request_id
        # On plain listeners: ACME challenges and the redirect to HTTPS come first.
        response: Response | None = self.plain_http.answer(request) if self.plain_http is not None else None
        match = self.router.match(request.host, request.path) if response is None else None
        if match is None:
            if response is None:
                response = error_response(request, 404, "no route for this host and path")
                response.close_connection = request.has_body
            if self.security_headers is not None:
                self.security_headers.decorate(response, request.scheme == "https")
        else:
            route = match.target
            record.route = route.name
            started = time.perf_counter()
            try:
                response = route.handler(request)
                if route.config.server_timing:
                    response.headers.append(("Server-Timing", server_timing(record, started)))
            except Exception:
                log.exception("error handling %s %s, request_id=%s",
                              request.method, request.target, request.request_id)
                response = error_response(request, 500, "internal error in the proxy")
                response.close_connection = True
        if response.header("X-Request-ID") is None:
            response.headers.append(("X-Request-ID", request.request_id))
        return response

    def shutdown(self) -> None:
        """The worker is stopping gracefully: WebSocket peers get going-away."""
        self.tunnels.going_away()
        self.admin.shutdown()

    def close(self) -> None:
        for upstream in self.upstreams.values():
            upstream.close()


def server_timing(record: RequestRecord, started: float) -> str:
    """Time in the proxy, waiting for the upstream, and the cache's verdict."""
    total = (time.perf_counter() - started) * 1000
    upstream = record.upstream_ms
    parts = []
    if upstream is not None:
        parts.append(f"proxy;dur={max(0.0, total - upstream):.1f}")
        parts.append(f"upstream;dur={upstream:.1f}")
    else:
        parts.append(f"proxy;dur={total:.1f}")
    if record.cache:
        cache_ms = record.cache_ms
        parts.append(f'cache;desc="{record.cache}";dur={"0" if cache_ms is None else f"{cache_ms:.2f}"}')
    return ", ".join(parts)


def build(path: str | None = None) -> Proxy:
    # Under gunicorn.conf.py the master has validated the config already
    # (and kept the last good one across reloads): use that.
    served = serving_config()
    if served is not None and (path is None or os.path.abspath(path) == served.path):
        return Proxy(served)
    return Proxy(config_module.load(path or config_module.config_path()))


def __getattr__(name: str) -> Proxy:
    # Built on first access, i.e. when gunicorn loads the app in a worker,
    # so that importing this module never reads a config by surprise.
    if name == "application":
        app = build()
        globals()["application"] = app
        return app
    raise AttributeError(name)
