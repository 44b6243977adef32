"""Path filter: deny (and optionally allow) lists of prefixes and globs.

Matched against the canonical path: percent-decoded, `//`, `/./` and `/../`
resolved (done for every request, see http.normalize_path), then path
parameters (`/admin;x`) and trailing dots (`/admin.`) dropped from each
segment, and lower-cased when `case_insensitive = yes`. So `/%61dmin`,
`//admin`, `/x/../admin` and `/admin;x` cannot get past `deny = /admin`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..http import Request, Response, error_response
from ..routing import prefix_matches
from ..values import boolean, one_of, path_patterns, setting


@dataclass(frozen=True)
class FilterConfig:
    name: str
    deny: tuple[str, ...] = setting("", path_patterns, "Paths refused: prefixes (/admin) and globs (*.php).")
    allow: tuple[str, ...] = setting("", path_patterns,
                                     "When set, only these paths are served (deny still applies).")
    status: str = setting("404", one_of("404", "403"), "The answer to a refused path: 404 or 403.")
    case_insensitive: bool = setting("no", boolean,
                                     "Match regardless of case (for upstreams that ignore it).")


def canonical(path: str, case_insensitive: bool) -> str:
    if ";" in path or "." in path:
        segments = []
        for segment in path.split("/"):
            segment = segment.split(";", 1)[0]
            stripped = segment.rstrip(".")
            segments.append(stripped if stripped else segment)
        path = "/".join(segments)
    return path.lower() if case_insensitive else path


def _matcher(patterns: tuple[str, ...], case_insensitive: bool):
    if case_insensitive:
        patterns = tuple(p.lower() for p in patterns)
    globs = [p for p in patterns if any(c in p for c in "*?[")]
    prefixes = [p for p in patterns if p not in globs]

    def matches(path: str) -> bool:
        return (any(prefix_matches(p, path) for p in prefixes)
                or any(fnmatchcase(path, g) for g in globs))
    return matches


class PathFilter:
    def __init__(self, config: FilterConfig):
        self.case_insensitive = config.case_insensitive
        self.denied = _matcher(config.deny, config.case_insensitive)
        self.allowed = _matcher(config.allow, config.case_insensitive) if config.allow else None
        self.status = int(config.status)

    def refuses(self, path: str) -> bool:
        path = canonical(path, self.case_insensitive)
        return (self.allowed is not None and not self.allowed(path)) or self.denied(path)

    def __call__(self, request: Request, call_next) -> Response:
        if self.refuses(request.path):
            request.environ["rproxy.error"] = "path refused by the filter"
            response = error_response(request, self.status, "not found" if self.status == 404 else "forbidden")
            response.close_connection = request.has_body
            return response
        return call_next(request)


def make(config: FilterConfig, shared: dict) -> PathFilter:
    return PathFilter(config)
