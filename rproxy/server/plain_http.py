"""What rproxy answers itself on its plain-HTTP listeners when it serves TLS.

- The scheme: gunicorn calls every request "https" once TLS is configured,
  whichever listener it came in on; a request on a plain listener is "http"
  (or "https" when a trusted proxy in front says so with X-Forwarded-Proto).
- ACME HTTP-01 challenges (`/.well-known/acme-challenge/TOKEN`) pending in
  [acme] cache_dir (or, with [acme] storage, in the fleet's store: looked
  up there only when not found locally) are answered by every worker, on
  any listener. Other
  challenge paths are never redirected, so an upstream can answer its own.
- With `redirect_http = yes`, everything else gets a 308 to the same URL
  over HTTPS (308 keeps the method and body, unlike 301).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rproxy.config.addresses import listener_key
from rproxy.messages import Request, Response, error_response
from rproxy.server.listeners import is_tls
from rproxy.storage_guard import StorageGuard
from rproxy.tls import acme_cache, acme_store

if TYPE_CHECKING:
    from rproxy.client_address import Forwarding
    from rproxy.config import Config


class PlainHttp:
    def __init__(self, config: Config, forwarding: Forwarding) -> None:
        server = config.server
        self.forwarding = forwarding
        self.redirect = server.redirect_http and bool(server.http_bind)
        port = server.https_port
        if port is None:
            first = listener_key(server.bind[0]) if server.bind else None
            port = first if isinstance(first, int) else 443
        self.port_suffix = "" if port == 443 else f":{port}"
        self.cache = acme_cache.CacheDir(config.acme) if config.acme.domains else None
        self.acme = config.acme
        # The fleet's store, connected at the first challenge path.
        self.store: acme_store.RedisStore | None = None
        self.guard: StorageGuard | None = None

    def _store(self) -> acme_store.RedisStore | None:
        if self.store is None and self.acme.storage:
            self.store = acme_cache.shared_store(self.acme, timeout=2.0)
            self.guard = StorageGuard("acme", self.acme.storage, retry=5.0,
                                      while_down="HTTP-01 challenges are answered from cache_dir alone")
        return self.store

    def set_scheme(self, environ: dict[str, Any]) -> None:
        if is_tls(environ):
            return
        trusted_https = (environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower() == "https"
                         and self.forwarding.is_trusted(environ.get("REMOTE_ADDR", "")))
        environ["wsgi.url_scheme"] = "https" if trusted_https else "http"

    def answer(self, request: Request) -> Response | None:
        """The proxy's own answer to this request, or None to route it."""
        if request.path.startswith(acme_cache.CHALLENGE_PREFIX):
            if self.cache is not None and request.method in ("GET", "HEAD"):
                key_authorization = acme_cache.challenge_answer(self.cache, request.path, self._store(), self.guard)
                if key_authorization is not None:
                    return Response(200, [("Content-Type", "text/plain"),
                                          ("Content-Length", str(len(key_authorization))),
                                          ("Cache-Control", "no-store")], [key_authorization])
            return None
        if not self.redirect or request.scheme != "http" or is_tls(request.environ):
            return None
        if not request.host:
            response = error_response(request, 400, "a Host header is needed to redirect to HTTPS")
        else:
            location = f"https://{request.host}{self.port_suffix}{request.target}"
            body = f"308 Permanent Redirect: {location}\n".encode()
            response = Response(308, [("Location", location), ("Content-Type", "text/plain; charset=utf-8"),
                                      ("Content-Length", str(len(body)))], [body])
        # The body of the request, if any, was not read: the connection cannot go on.
        response.close_connection = request.has_body
        return response
