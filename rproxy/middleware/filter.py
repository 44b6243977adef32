"""Path filter: deny (and optionally allow) lists of prefixes and globs.

Judged on the request's canonical path (target.py: decoded once, `//`, `.`
and `..` resolved, fragments, backslashes and ambiguous dot forms refused
before any middleware runs), read the way the most lenient upstream reads
it: each segment without its path parameters and trailing dots and spaces
(`/admin;x`, `/admin.`, `/admin%20` are `/admin`), and regardless of case
unless `case_insensitive = no`. A deny glob also refuses every path below a
match (`*.php` refuses `/x.php/foo`, which PHP serves as `x.php`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

from rproxy.messages import Request, Response, error_response
from rproxy.routing import prefix_matches
from rproxy.target import judged
from rproxy.values import boolean, one_of, path_patterns, setting


@dataclass(frozen=True)
class FilterConfig:
    name: str
    deny: tuple[str, ...] = setting("", path_patterns, "Paths refused: prefixes (/admin) and globs (*.php).")
    allow: tuple[str, ...] = setting("", path_patterns,
                                     "When set, only these paths are served (deny still applies).")
    status: str = setting("404", one_of("404", "403"), "The answer to a refused path: 404 or 403.")
    case_insensitive: bool = setting("yes", boolean,
                                     "Match regardless of case (`no` for an upstream known to tell case apart).")


def canonical(path: str, case_insensitive: bool) -> str:
    """The path the filter judges (see the module's first lines)."""
    path = judged(path)
    return path.lower() if case_insensitive else path


def _matcher(patterns: tuple[str, ...], case_insensitive: bool,
             below: bool) -> Callable[[str], str | None]:
    """path -> the first pattern that matches it, or None. With `below`, a
    glob matches a path when it matches the path or any of its parents."""
    keyed = [(p.lower() if case_insensitive else p, p) for p in patterns]
    globs = [(k, p) for k, p in keyed if any(c in k for c in "*?[")]
    prefixes = [(k, p) for k, p in keyed if (k, p) not in globs]

    def first(path: str) -> str | None:
        for key, pattern in prefixes:
            if prefix_matches(key, path):
                return pattern
        if globs:
            candidates = [path]
            if below:
                end = path.find("/", 1)
                while end > 0:
                    candidates.append(path[:end])
                    end = path.find("/", end + 1)
            for key, pattern in globs:
                if any(fnmatchcase(candidate, key) for candidate in candidates):
                    return pattern
        return None
    return first


class PathFilter:
    def __init__(self, config: FilterConfig):
        self.name = config.name
        self.case_insensitive = config.case_insensitive
        self.denied = _matcher(config.deny, config.case_insensitive, below=True)
        self.allowed = _matcher(config.allow, config.case_insensitive, below=False) if config.allow else None
        self.status = int(config.status)

    def verdict(self, path: str) -> str | None:
        """Why `path` is refused ('deny /admin', 'not in allow'), or None."""
        path = canonical(path, self.case_insensitive)
        denied = self.denied(path)
        if denied is not None:
            return f"deny {denied}"
        if self.allowed is not None and self.allowed(path) is None:
            return "not in allow"
        return None

    def refuses(self, path: str) -> bool:
        return self.verdict(path) is not None

    def __call__(self, request: Request, call_next) -> Response:
        if self.refuses(request.path):
            request.record.error = "path refused by the filter"
            response = error_response(request, self.status, "not found" if self.status == 404 else "forbidden")
            response.close_connection = request.has_body
            return response
        return call_next(request)


def make(config: FilterConfig, shared: dict) -> PathFilter:
    return PathFilter(config)
