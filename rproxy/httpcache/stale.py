"""When a stale stored response may still answer, as pure functions.

Two permissions exist beside RFC 9111's max-stale (rules.py):
- stale-while-revalidate=N (RFC 5861 3, in the response's Cache-Control):
  up to N seconds past freshness, answer with the stored response at once
  and revalidate it in the background;
- on an upstream failure, answer with the stored response instead of the
  error: within stale-if-error=N (RFC 5861 4, the response's or the
  request's), or, for origins that send neither, as the `[cache] use_stale`
  switch allows (nginx's `proxy_cache_use_stale` names: error, timeout,
  http_500, http_502, http_503, http_504), up to `stale_keep` past freshness.

Explicit prohibitions win (RFC 9111 4.2.4): a stored response with
no-cache, must-revalidate or proxy-revalidate is never served stale. The
s-maxage directive implies proxy-revalidate, so it stops the use_stale switch,
but not the origin's own stale-* directives sent beside it (a common
"s-maxage=60, stale-while-revalidate=30" asks for exactly that).
"""

from __future__ import annotations

from rproxy.httpcache.rules import Entry, directives, seconds

FAILURES = ("error", "timeout", "http_500", "http_502", "http_503", "http_504")
_FORBIDDING = ("no-cache", "must-revalidate", "proxy-revalidate")


def use_stale(raw: str) -> frozenset[str]:
    """The `use_stale` config value: nginx's condition names, or off."""
    names = raw.lower().split()
    if names in ([], ["off"]):
        return frozenset()
    unknown = [n for n in names if n not in FAILURES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not one of: {', '.join(FAILURES)} (or off)")
    return frozenset(names)


def failure(status: int, generated: bool) -> str | None:
    """What went wrong, in use_stale's names, for a response the upstream
    sent (`generated` False) or the forwarder made for a failure to reach
    it (True: 504 for a timeout, 502/503 for the rest); None for success."""
    if generated:
        return "timeout" if status == 504 else "error" if status >= 500 else None
    return f"http_{status}" if status in (500, 502, 503, 504) else None


def _window(cc: dict[str, str | None], name: str) -> int:
    return (seconds(cc.get(name)) or 0) if name in cc else 0


def staleness(entry: Entry, now: float | None = None) -> float:
    """Seconds past freshness (negative while fresh)."""
    return entry.age(now) - entry.freshness_lifetime()


def kept_stale(entry: Entry) -> int:
    """How long past freshness the entry's own directives may use it."""
    cc = entry.cache_control()
    return max(_window(cc, "stale-while-revalidate"), _window(cc, "stale-if-error"))


def while_revalidating(entry: Entry, request_headers: dict[str, str], now: float | None = None) -> bool:
    """May the stale entry answer now, while it is revalidated in the background?"""
    cc = entry.cache_control()
    if "stale-while-revalidate" not in cc or any(name in cc for name in _FORBIDDING):
        return False
    request_cc = directives(request_headers.get("Cache-Control"))
    # A client asking for a fresh or a validated answer gets one.
    if "no-cache" in request_cc or "max-age" in request_cc or "min-fresh" in request_cc:
        return False
    if request_headers.get("Pragma", "").lower() == "no-cache" and "Cache-Control" not in request_headers:
        return False
    late = staleness(entry, now)
    return 0 <= late <= _window(cc, "stale-while-revalidate")


def on_failure(entry: Entry, request_headers: dict[str, str], what: str, switch: frozenset[str],
               keep: float, now: float | None = None) -> str | None:
    """May the stale entry answer instead of the failure `what` (failure())?
    Returns the permission used ("stale-if-error" or "use_stale"), or None."""
    cc = entry.cache_control()
    if any(name in cc for name in _FORBIDDING):
        return None
    late = staleness(entry, now)
    request_cc = directives(request_headers.get("Cache-Control"))
    if (("stale-if-error" in cc or "stale-if-error" in request_cc)
            and late <= max(_window(cc, "stale-if-error"), _window(request_cc, "stale-if-error"))):
        return "stale-if-error"
    if what in switch and late <= keep and "s-maxage" not in cc:
        return "use_stale"
    return None
