"""RFC 9111 for a shared cache, as pure functions: what may be stored, for
how long it is fresh, how old a stored response is, whether it may be
served, and which stored variant a request selects (Vary). The header
grammars these rules read (HTTP-date, Age, targeted cache-control fields)
are parsed here too, strictly, as the RFCs say.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rproxy.httpcache.disk import FileBody

# RFC 9110 15.1: statuses cacheable by default (heuristic freshness allowed).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# The statuses this cache stores at all (partial content is never stored).
STORABLE_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 403}
HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 24 * 3600.0
# RFC 9111 1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_MAX = 2 ** 31
# Directives whose argument is a delta-seconds: in a targeted field (a
# Structured Field) any other type of value makes the directive ignored.
DELTA_DIRECTIVES = frozenset({"max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"})
# Request headers that mark a response as someone's own: without explicit
# freshness from the origin, it is not guessed (heuristic) for them.
CREDENTIALS = ("Authorization", "Cookie")


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
    return min(DELTA_MAX, max(0, number))


_DAYS = "mon|tue|wed|thu|fri|sat|sun"
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_TIME = r"(\d\d):(\d\d):(\d\d)"
# RFC 9110 5.6.7: the three forms a recipient must accept, and nothing else
# (a two-digit year in the first form, another zone than GMT, a missing
# comma, doubled spaces or a one-digit hour make the value invalid). Names
# are matched without regard to case, as most caches do.
_IMF_FIXDATE = re.compile(rf"(?:{_DAYS}), (\d\d) ([a-z]{{3}}) (\d{{4}}) {_TIME} gmt", re.I)
_RFC850_DATE = re.compile(r"(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
                          rf", (\d\d)-([a-z]{{3}})-(\d\d) {_TIME} gmt", re.I)
_ASCTIME_DATE = re.compile(rf"(?:{_DAYS}) ([a-z]{{3}}) ([ \d]\d) {_TIME} (\d{{4}})", re.I)


def http_date(value: str | None, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7) as a timestamp; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if match := _IMF_FIXDATE.fullmatch(value):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850_DATE.fullmatch(value):
        day, month, short, hour, minute, second = match.groups()
        # A two-digit year more than 50 years ahead is in the past century.
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year - this_year % 100 + int(short)
        if year > this_year + 50:
            year -= 100
    elif match := _ASCTIME_DATE.fullmatch(value):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    if month.lower() not in _MONTHS:
        return None
    fields = (int(year), _MONTHS.index(month.lower()) + 1, int(day), int(hour), int(minute), int(second))
    if not (1 <= fields[2] <= calendar.monthrange(fields[0], fields[1])[1] and fields[3] < 24
            and fields[4] < 60 and fields[5] < 61):
        return None
    return float(calendar.timegm((*fields, 0, 0, 0)))


# RFC 8941 3.2 / 4.2.2: a Structured Field Dictionary, as targeted
# cache-control fields are written (RFC 9213 2.1). Inner lists and
# parameters are read and dropped: no cache directive uses them.
_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_ITEM = re.compile(r'-?\d{1,12}\.\d{1,3}(?![\d.])|-?\d{1,15}(?![\d.])|"(?:[ !#-\[\]-~]|\\["\\])*"'
                      r"|[A-Za-z*][!#$%&'*+\-.^_`|~:/0-9A-Za-z]*|:[A-Za-z0-9+/=]*:|\?[01]")
_SF_INNER_LIST = re.compile(rf"\((?: *(?:{_SF_ITEM.pattern})(?:;[a-z*][a-z0-9_\-.*]*(?:=(?:{_SF_ITEM.pattern}))?)*)* *\)")
_SF_PARAMETERS = re.compile(rf"(?:; *[a-z*][a-z0-9_\-.*]*(?:=(?:{_SF_ITEM.pattern}))?)*")


def targeted_directives(value: str) -> dict[str, str | None] | None:
    """A targeted cache-control field (RFC 9213) as directives; None when it
    is not a valid Structured Field Dictionary. A directive whose value has
    the wrong type (max-age="60", a decimal, a token) is dropped, as RFC 9213
    2.1 says; a false boolean is absent."""
    text, pos, result = value.strip(" "), 0, {}
    while pos < len(text):
        key = _SF_KEY.match(text, pos)
        if key is None:
            return None
        pos, item = key.end(), "?1"
        if text.startswith("=", pos):
            found = _SF_ITEM.match(text, pos + 1) or _SF_INNER_LIST.match(text, pos + 1)
            if found is None:
                return None
            pos, item = found.end(), found.group()
        parameters = _SF_PARAMETERS.match(text, pos)
        assert parameters is not None  # the pattern matches the empty string too
        pos = parameters.end()
        result[key.group()] = item  # a repeated key: the last one counts (RFC 8941 4.2.2)
        while text.startswith((" ", "\t"), pos):
            pos += 1
        if pos < len(text):
            if text[pos] != ",":
                return None
            pos += 1
            while text.startswith((" ", "\t"), pos):
                pos += 1
            if pos == len(text):
                return None  # a trailing comma
    out: dict[str, str | None] = {}
    for name, item in result.items():
        integer = item.lstrip("-").isdigit()
        if name in DELTA_DIRECTIVES and not integer or item == "?0":
            continue
        out[name] = None if item == "?1" else re.sub(r"\\(.)", r"\1", item[1:-1]) if item.startswith('"') else item
    return out


def response_directives(headers: list[tuple[str, str]], targets: tuple[str, ...] = ()
                        ) -> tuple[dict[str, str | None], str | None]:
    """The cache directives this cache obeys, and the targeted field they
    came from (None: Cache-Control). RFC 9213 2.1: the first field of the
    target list with a valid, non-empty value replaces Cache-Control and
    Expires for this cache; an invalid or empty one is ignored."""
    for name in targets:
        value = header(headers, name)
        if value is not None and value.strip():
            parsed = targeted_directives(value)
            if parsed is not None:
                return parsed, name
    return directives(header(headers, "Cache-Control")), None


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """All values of a header, joined as one list; None when absent."""
    lname = name.lower()
    values = [v for k, v in headers if k.lower() == lname]
    return ", ".join(values) if values else None


class _Derived:
    """What an Entry's rules read from its headers, computed once: a hit
    asks for its age and lifetime several times, and headers never change
    once stored (a 304 makes a new Entry). Kept in memory only: the stores
    serialise the response, never this."""

    __slots__ = ("targets", "fields", "date", "cc", "lifetime", "base_age", "served_headers")

    def __init__(self, entry: Entry):
        fields: dict[str, list[str]] = {}
        for name, value in entry.headers:
            fields.setdefault(name.lower(), []).append(value)
        self.targets = entry.targets
        self.fields = {name: ", ".join(values) for name, values in fields.items()}
        self.date = http_date(self.fields.get("date")) or entry.response_time
        self.cc, targeted = response_directives(entry.headers, entry.targets)
        self.lifetime = _lifetime(entry, self, targeted)
        # RFC 9111 4.2.3: the age when it was received; it grows with the clock.
        apparent = max(0.0, entry.response_time - self.date)
        corrected = age_value(entry.headers) + (entry.response_time - entry.request_time)
        self.base_age = max(apparent, corrected)
        # What a hit sends of the stored headers (Age and the cache's own are new on each).
        self.served_headers = [(k, v) for k, v in entry.headers
                               if k.lower() not in ("age", "x-cache", "surrogate-control")]


def _lifetime(entry: Entry, derived: _Derived, targeted: str | None) -> float:
    """RFC 9111 4.2.1, for a shared cache; Surrogate-Control (a gateway's
    own directives) first, then a targeted field (which makes Expires
    ignored, RFC 9213 2.1), then Cache-Control and Expires."""
    surrogate = surrogate_directives(entry.headers)
    surrogate_age = seconds(surrogate["max-age"]) if "max-age" in surrogate else None
    if surrogate_age is not None:
        return float(surrogate_age)
    cc = derived.cc
    for name in ("s-maxage", "max-age"):
        value = seconds(cc.get(name)) if name in cc else None
        if value is not None:
            return float(value)
    expires = derived.fields.get("expires") if targeted is None else None
    if expires is not None:
        # RFC 9111 5.3: an invalid date, "0" included, means already
        # expired; so do several Expires lines (a singleton field, joined
        # here into one value that is no HTTP-date).
        expiry = http_date(expires)
        return max(0.0, expiry - derived.date) if expiry is not None else 0.0
    if entry.status in HEURISTIC_STATUSES or "public" in cc:
        modified = http_date(derived.fields.get("last-modified"))
        if modified is not None:
            return min(HEURISTIC_CAP, max(0.0, (derived.date - modified) * HEURISTIC_FRACTION))
    return 0.0


@dataclass
class Entry:
    """A stored response and what its freshness is computed from."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | FileBody  # a disk store's large bodies stay in their file
    request_time: float
    response_time: float
    vary: dict[str, str | None] = field(default_factory=dict)  # request header -> value it was stored for
    # The targeted fields ([cache] targeted_fields) this cache reads, in order.
    targets: tuple[str, ...] = ()
    _derived: _Derived | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 200

    def derived(self) -> _Derived:
        derived = self._derived
        # The targets are config, set by the cache that reads the entry.
        if derived is None or derived.targets != self.targets:
            derived = self._derived = _Derived(self)
        return derived

    def header(self, name: str) -> str | None:
        """All values of a stored header, joined as one list; None when absent."""
        return self.derived().fields.get(name.lower())

    def cache_control(self) -> dict[str, str | None]:
        """The directives this cache obeys (a targeted field, or Cache-Control); not to be changed."""
        return self.derived().cc

    def freshness_lifetime(self) -> float:
        """RFC 9111 4.2.1 (see _lifetime)."""
        return self.derived().lifetime

    def age(self, now: float | None = None) -> float:
        """RFC 9111 4.2.3."""
        now = time.time() if now is None else now
        return self.derived().base_age + (now - self.response_time)

    def must_revalidate_when_stale(self) -> bool:
        cc = self.cache_control()
        return "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc

    def validators(self) -> list[tuple[str, str]]:
        out = []
        etag = self.header("ETag")
        if etag:
            out.append(("If-None-Match", etag))
        modified = self.header("Last-Modified")
        if modified:
            out.append(("If-Modified-Since", modified))
        return out


def age_value(headers: list[tuple[str, str]]) -> int:
    """The Age the upstream sent (RFC 9111 5.1). A list (one line or several)
    counts by its first member; an invalid value (negative, a decimal,
    parameters, text) is ignored, as is an absent one: 0. A value too large
    is 2^31 (1.2.2)."""
    for name, value in headers:
        if name.lower() == "age":
            first = value.split(",", 1)[0].strip()
            return min(int(first), DELTA_MAX) if first.isascii() and first.isdigit() else 0
    return 0


def storable(method: str, request_headers: dict[str, str], status: int,
             headers: list[tuple[str, str]], targets: tuple[str, ...] = ()) -> tuple[bool, str]:
    """May a shared cache store this response? (RFC 9111 3.) Returns (verdict, why).
    `targets`: the targeted fields (RFC 9213) this cache reads, in order."""
    if method != "GET":
        return False, "method"
    # Interim (1xx) responses are never stored: only final ones are listed.
    if status not in STORABLE_STATUSES:
        return False, f"status {status}"
    request_cc = directives(request_headers.get("Cache-Control"))
    if "no-store" in request_cc:
        return False, "request no-store"
    cc, targeted = response_directives(headers, targets)
    surrogate = surrogate_directives(headers)
    if "no-store" in surrogate:
        return False, "Surrogate-Control: no-store"
    # RFC 9111 5.2.2.3: must-understand stores a response only for a status
    # this cache implements (the storable ones), and then overrides no-store.
    if "no-store" in cc and "max-age" not in surrogate and "must-understand" not in cc:
        return False, "no-store"
    if "private" in cc:
        return False, "private"
    if header(headers, "Set-Cookie") is not None:
        return False, "Set-Cookie"
    if "*" in (v.strip() for v in (header(headers, "Vary") or "").split(",")):
        return False, "Vary: *"
    if "Authorization" in request_headers and not ({"public", "s-maxage", "must-revalidate"} & cc.keys()):
        return False, "Authorization"
    expires = targeted is None and header(headers, "Expires") is not None
    explicit = ("max-age" in cc or "s-maxage" in cc or expires or "public" in cc or "no-cache" in cc
                or "max-age" in surrogate)
    if explicit:
        return True, ""
    if status not in HEURISTIC_STATUSES or header(headers, "Last-Modified") is None:
        return False, "no freshness information"
    # A guessed lifetime is for shared content: a response to a request with
    # credentials is stored only when the origin says it may be.
    for name in CREDENTIALS:
        if name in request_headers:
            return False, f"heuristic freshness for a request with {name}"
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
        etag = entry.header("ETag")
        if etag is None:
            return False
        if if_none_match.strip() == "*":
            return True
        weak = lambda tag: tag.strip().removeprefix("W/")  # noqa: E731
        return weak(etag) in {weak(t) for t in if_none_match.split(",")}
    since = http_date(request_headers.get("If-Modified-Since"))
    if since is not None:
        modified = http_date(entry.header("Last-Modified"))
        return modified is not None and modified <= since
    return False
