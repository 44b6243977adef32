"""Security headers on every response the proxy sends, its own error pages
included: HSTS (HTTPS responses only), X-Content-Type-Options,
X-Frame-Options, Referrer-Policy, Content-Security-Policy,
Permissions-Policy. An upstream's own value wins unless `override = yes`;
headers listed in `remove` (X-Powered-By by default) are taken out.
"""

from __future__ import annotations

from dataclasses import dataclass

from rproxy.messages import Request, Response
from rproxy.values import boolean, header_value, setting, words


@dataclass(frozen=True)
class SecurityHeadersConfig:
    name: str
    hsts: str = setting("max-age=31536000; includeSubDomains", header_value,
                        "Strict-Transport-Security, sent on HTTPS responses only; empty = none.")
    content_type_options: str = setting("nosniff", header_value, "X-Content-Type-Options; empty = none.")
    frame_options: str = setting("SAMEORIGIN", header_value, "X-Frame-Options; empty = none.")
    referrer_policy: str = setting("strict-origin-when-cross-origin", header_value,
                                   "Referrer-Policy; empty = none.")
    content_security_policy: str = setting("", header_value, "Content-Security-Policy; empty = none.")
    permissions_policy: str = setting("", header_value, "Permissions-Policy; empty = none.")
    override: bool = setting("no", boolean, "Replace the upstream's own values of these headers.")
    remove: tuple[str, ...] = setting("X-Powered-By", words,
                                      "Upstream response headers to remove, e.g. X-Powered-By Server.")


class SecurityHeaders:
    def __init__(self, config: SecurityHeadersConfig):
        self.override = config.override
        pairs = [("X-Content-Type-Options", config.content_type_options),
                 ("X-Frame-Options", config.frame_options),
                 ("Referrer-Policy", config.referrer_policy),
                 ("Content-Security-Policy", config.content_security_policy),
                 ("Permissions-Policy", config.permissions_policy)]
        self.always = [(k, v) for k, v in pairs if v]
        self.hsts = [("Strict-Transport-Security", config.hsts)] if config.hsts else []
        self.remove = frozenset(h.lower() for h in config.remove)

    def __call__(self, request: Request, call_next) -> Response:
        return self.decorate(call_next(request), request.scheme == "https")

    def decorate(self, response: Response, https: bool) -> Response:
        wanted = self.always + self.hsts if https else self.always
        names = {k.lower() for k, _ in wanted}
        present = set()
        kept = []
        for key, value in response.headers:
            lower = key.lower()
            if lower in self.remove or (self.override and lower in names):
                continue
            present.add(lower)
            kept.append((key, value))
        kept.extend((k, v) for k, v in wanted if k.lower() not in present)
        response.headers = kept
        return response


def make(config: SecurityHeadersConfig, shared: dict) -> SecurityHeaders:
    return SecurityHeaders(config)
