"""RFC 9111 for a shared cache, as pure functions: what may be stored, for
how long it is fresh, how old a stored response is, whether it may be
served, and which stored variant a request selects (Vary).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

# RFC 9110 15.1: statuses cacheable by default (heuristic freshness allowed).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# The statuses this cache stores at all (partial content is never stored).
STORABLE_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 403}
HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 24 * 3600.0


def directives(value: str | None) -> dict[str, str | None]:
    """'max-age=60, no-cache="Set-Cookie", public' -> {'max-age': '60', ...}."""
    result: dict[str, str | None] = {}
    if not value:
        return result
    for part in value.split(","):
        name, sep, arg = part.strip().partition("=")
        name = name.strip().lower()
        if name:
            result[name] = arg.strip().strip('"') if sep else None
    return result


def surrogate_directives(headers: list[tuple[str, str]]) -> dict[str, str | None]:
    """Surrogate-Control, whose directives may name a target after ';'."""
    return {name: arg.split(";", 1)[0] if arg is not None else None
            for name, arg in directives(header(headers, "Surrogate-Control")).items()}


def seconds(value: str | None) -> int | None:
    """A delta-seconds argument; None when absent or malformed."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return max(0, number)


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """All values of a header, joined as one list; None when absent."""
    lname = name.lower()
    values = [v for k, v in headers if k.lower() == lname]
    return ", ".join(values) if values else None


@dataclass
class Entry:
    """A stored response and what its freshness is computed from."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    request_time: float
    response_time: float
    vary: dict[str, str | None] = field(default_factory=dict)  # request header -> value it was stored for

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 200

    def cache_control(self) -> dict[str, str | None]:
        return directives(header(self.headers, "Cache-Control"))

    def freshness_lifetime(self) -> float:
        """RFC 9111 4.2.1, for a shared cache; Surrogate-Control (a gateway's
        own directives) first. An invalid Age makes the response stale."""
        if age_value(self.headers) is None:
            return 0.0
        surrogate = surrogate_directives(self.headers)
        if "max-age" in surrogate and seconds(surrogate["max-age"]) is not None:
            return float(seconds(surrogate["max-age"]))
        cc = self.cache_control()
        for name in ("s-maxage", "max-age"):
            value = seconds(cc.get(name)) if name in cc else None
            if value is not None:
                return float(value)
        expires = header(self.headers, "Expires")
        if expires is not None:
            expiry = http_date(expires)
            date = http_date(header(self.headers, "Date")) or self.response_time
            return max(0.0, expiry - date) if expiry is not None else 0.0  # invalid Expires: stale
        if self.status in HEURISTIC_STATUSES or "public" in cc:
            modified = http_date(header(self.headers, "Last-Modified"))
            if modified is not None:
                date = http_date(header(self.headers, "Date")) or self.response_time
                return min(HEURISTIC_CAP, max(0.0, (date - modified) * HEURISTIC_FRACTION))
        return 0.0

    def age(self, now: float | None = None) -> float:
        """RFC 9111 4.2.3."""
        now = time.time() if now is None else now
        date = http_date(header(self.headers, "Date")) or self.response_time
        apparent = max(0.0, self.response_time - date)
        corrected = (age_value(self.headers) or 0) + (self.response_time - self.request_time)
        return max(apparent, corrected) + (now - self.response_time)

    def must_revalidate_when_stale(self) -> bool:
        cc = self.cache_control()
        return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc

    def validators(self) -> list[tuple[str, str]]:
        out = []
        etag = header(self.headers, "ETag")
        if etag:
            out.append(("If-None-Match", etag))
        modified = header(self.headers, "Last-Modified")
        if modified:
            out.append(("If-Modified-Since", modified))
        return out


def age_value(headers: list[tuple[str, str]]) -> int | None:
    """The Age header's value: 0 when absent, None when invalid (RFC 9111
    5.1: a list, a negative or non-integer value, parameters...)."""
    values = [v.strip() for k, v in headers if k.lower() == "age"]
    if not values:
        return 0
    if len(values) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


def storable(method: str, request_headers: dict[str, str], status: int,
             headers: list[tuple[str, str]]) -> tuple[bool, str]:
    """May a shared cache store this response? (RFC 9111 3.) Returns (verdict, why)."""
    if method != "GET":
        return False, "method"
    if status not in STORABLE_STATUSES:
        return False, f"status {status}"
    request_cc = directives(request_headers.get("Cache-Control"))
    if "no-store" in request_cc:
        return False, "request no-store"
    cc = directives(header(headers, "Cache-Control"))
    surrogate = surrogate_directives(headers)
    if "no-store" in surrogate:
        return False, "Surrogate-Control: no-store"
    if "no-store" in cc and "max-age" not in surrogate:
        return False, "no-store"
    if "private" in cc:
        return False, "private"
    if header(headers, "Set-Cookie") is not None:
        return False, "Set-Cookie"
    if "*" in (v.strip() for v in (header(headers, "Vary") or "").split(",")):
        return False, "Vary: *"
    if "Authorization" in request_headers and not ({"public", "s-maxage", "must-revalidate"} & cc.keys()):
        return False, "Authorization"
    explicit = ("max-age" in cc or "s-maxage" in cc or header(headers, "Expires") is not None
                or "public" in cc or "no-cache" in cc or "max-age" in surrogate)
    heuristic = status in HEURISTIC_STATUSES and header(headers, "Last-Modified") is not None
    if not (explicit or heuristic):
        return False, "no freshness information"
    return True, ""


def vary_keys(headers: list[tuple[str, str]], request_headers: dict[str, str]) -> dict[str, str | None]:
    """The request headers a response varies on, with this request's values."""
    names = [n.strip().title() for n in (header(headers, "Vary") or "").split(",") if n.strip()]
    return {name: _normal(request_headers.get(name)) for name in names}


def _normal(value: str | None) -> str | None:
    return " ".join(value.split()) if value is not None else None


def selects(entry: Entry, request_headers: dict[str, str]) -> bool:
    return all(_normal(request_headers.get(name)) == value for name, value in entry.vary.items())


def fresh_enough(entry: Entry, request_headers: dict[str, str], now: float | None = None) -> bool:
    """May the entry answer this request without asking the upstream?"""
    cc = entry.cache_control()
    if "no-cache" in cc:
        return False
    request_cc = directives(request_headers.get("Cache-Control"))
    if "no-cache" in request_cc or (request_headers.get("Pragma", "").lower() == "no-cache"
                                    and "Cache-Control" not in request_headers):
        return False
    age = entry.age(now)
    lifetime = entry.freshness_lifetime()
    max_age = seconds(request_cc.get("max-age")) if "max-age" in request_cc else None
    if max_age is not None and age > max_age:
        return False
    min_fresh = seconds(request_cc.get("min-fresh")) if "min-fresh" in request_cc else None
    if min_fresh is not None and lifetime - age < min_fresh:
        return False
    if lifetime > age:
        return True
    if "max-stale" in request_cc and not entry.must_revalidate_when_stale():
        limit = seconds(request_cc["max-stale"]) if request_cc["max-stale"] is not None else None
        return limit is None or age - lifetime <= limit
    return False


def not_modified(entry: Entry, request_headers: dict[str, str]) -> bool:
    """Does the client's conditional GET match the stored response? (RFC 9110 13.1)"""
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        etag = header(entry.headers, "ETag")
        if etag is None:
            return False
        if if_none_match.strip() == "*":
            return True
        weak = lambda tag: tag.strip().removeprefix("W/")  # noqa: E731
        return weak(etag) in {weak(t) for t in if_none_match.split(",")}
    since = http_date(request_headers.get("If-Modified-Since"))
    if since is not None:
        modified = http_date(header(entry.headers, "Last-Modified"))
        return modified is not None and modified <= since
    return False
