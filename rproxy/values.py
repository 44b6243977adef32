"""Parsers for the value types an INI key can hold: durations, sizes, booleans,
addresses and lists. Each takes the raw string and returns the parsed value or
raises ValueError with a message that says what a valid value looks like."""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from dataclasses import field
from typing import Any, Callable, Mapping


def setting(raw: str | None, parse: Callable[[str], Any], doc: str, required: bool = False) -> Any:
    """Declares an INI key as a dataclass field: its default as written in
    the INI (None: unset), its parser and its documentation."""
    default = None if raw is None or required else parse(raw)
    return field(default=default, metadata={"parse": parse, "doc": doc, "raw": raw, "required": required})

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"(\d+)\s*([kmg]?)b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}


# About 31 years: longer ones are typos, and gunicorn's settings need finite ones.
_LONGEST_DURATION = 1e9


def duration(raw: str) -> float:
    """'500ms', '3s', '2m', '1h', '30d' or a bare number of seconds -> seconds."""
    match = _DURATION_RE.fullmatch(raw.strip())
    if not match:
        raise ValueError(f"{raw!r} is not a duration (use e.g. 500ms, 3s, 2m)")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(value) or value > _LONGEST_DURATION:
        raise ValueError(f"{raw!r} is too long a duration")
    return value


def positive_duration(raw: str) -> float:
    value = duration(raw)
    if value <= 0:
        raise ValueError(f"{raw!r} must be more than zero")
    return value


def size(raw: str) -> int:
    """'512k', '100m', '1g' or a bare number of bytes -> bytes."""
    match = _SIZE_RE.fullmatch(raw.strip())
    if not match:
        raise ValueError(f"{raw!r} is not a size (use e.g. 512k, 100m, 1g; 0 for no limit)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def between(parse: Callable[[str], int], low: int, high: int, unit: str = ""):
    """`parse`, and the value within [low, high]."""
    def parse_within(raw: str) -> int:
        value = parse(raw)
        if not low <= value <= high:
            raise ValueError(f"{raw!r} must be between {low} and {high}{unit}")
        return value
    return parse_within


def boolean(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not yes or no")


def count(raw: str) -> int:
    """A whole number, zero or more."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{raw!r} must not be negative")
    return value


def positive_count(raw: str) -> int:
    value = count(raw)
    if value < 1:
        raise ValueError(f"{raw!r} must be at least 1")
    return value


def words(raw: str) -> tuple[str, ...]:
    """A list separated by spaces or commas."""
    return tuple(w for w in re.split(r"[\s,]+", raw.strip()) if w)


def text(raw: str) -> str:
    return raw.strip()


def lower_words(raw: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in words(raw))


def readable_file(raw: str) -> str:
    path = raw.strip()
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from None
    return path


def path_prefix(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/"):
        raise ValueError(f"{raw!r} must start with /")
    if any(ch in value for ch in " \t?#\x00"):
        raise ValueError(f"{raw!r} must be a plain path (no spaces, query or fragment)")
    # '/api/' and '/api' name the same prefix: matching is by whole segments.
    return value.rstrip("/") or "/"


_VARIABLE_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|(\{))")


def substitute(raw: str, environ: Mapping[str, str]) -> str:
    """'${NAME}' and '${NAME:-default}' replaced from `environ` (the default
    also when NAME is empty, as in the shell); '$$' is a literal '$'. A
    missing NAME without default, or a '${' that is neither, is an error."""
    if "$" not in raw:
        return raw

    def replace(match: re.Match) -> str:
        name, default, broken = match.group(1), match.group(2), match.group(3)
        if match.group(0) == "$$":
            return "$"
        if broken:
            raise ValueError(f"{raw!r}: '${{' starts neither ${{NAME}} nor ${{NAME:-default}} "
                             "(write $$ for a literal $)")
        value = environ.get(name, "")
        if value:
            return value
        if default is not None:
            return default
        if name in environ:
            return ""
        raise ValueError(f"${{{name}}} is not set in the environment "
                         f"(set it, or give a default: ${{{name}:-...}})")

    return _VARIABLE_RE.sub(replace, raw)


def masked(message: str, raw: str, environ: Mapping[str, str]) -> str:
    """`message` about the value `raw` gave, with what came from `environ`
    shown as the ${NAME} it came from: it may be a secret."""
    for match in _VARIABLE_RE.finditer(raw):
        value = environ.get(match.group(1) or "", "")
        # Short values are left: they say nothing and would garble the message.
        if len(value) >= 4:
            message = message.replace(value, "${" + match.group(1) + "}")
    return message


def one_of(*choices: str):
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"{raw!r} is not one of: {', '.join(choices)}")
        return value

    parse.__name__ = "one_of"
    return parse


def statuses(raw: str) -> frozenset[int]:
    """'200-399 418' -> the set of those status codes."""
    codes: set[int] = set()
    for word in words(raw):
        low, _, high = word.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"{word!r} is not a status code or a range like 200-399")
        first, last = int(low), int(high or low)
        if not 100 <= first <= last <= 599:
            raise ValueError(f"{word!r} is not within 100-599")
        codes.update(range(first, last + 1))
    return frozenset(codes)


def health_check(raw: str) -> tuple[str, str] | None:
    """'GET /healthz' or '/healthz' -> (method, path); empty -> None (off)."""
    parts = words(raw)
    if not parts:
        return None
    if len(parts) == 1:
        parts = ("GET", parts[0])
    method, path = parts[0].upper(), parts[-1]
    if len(parts) != 2 or method not in ("GET", "HEAD", "OPTIONS") or not path.startswith("/"):
        raise ValueError(f"{raw!r} is not like 'GET /healthz'")
    return method, path


def hash_key(raw: str) -> str:
    """'ip', 'path' or 'header:NAME'."""
    value = raw.strip()
    if value in ("ip", "path"):
        return value
    if value.lower().startswith("header:") and re.fullmatch(r"[A-Za-z0-9-]+", value[7:]):
        return "header:" + value[7:]
    raise ValueError(f"{raw!r} is not ip, path or header:NAME")


def section_choice(raw: str) -> str:
    """A section name, 'off', or empty (the global section)."""
    value = raw.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"{raw!r} is not a section name or off")
    return value


def limits(raw: str) -> str:
    """'100/minute; 10/second' in the `limits` package's notation."""
    from limits import parse_many
    try:
        items = parse_many(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not like '100/minute; 10/second'") from None
    if not items:
        raise ValueError("names no limit")
    return raw.strip()


def path_patterns(raw: str) -> tuple[str, ...]:
    """Prefixes ('/admin') and globs ('*.php', '/private/*')."""
    result = []
    for word in words(raw):
        if not (word.startswith("/") or word.startswith("*")):
            raise ValueError(f"{word!r} is neither a /prefix nor a *glob")
        result.append(word if any(c in word for c in "*?[") else (word.rstrip("/") or "/"))
    return tuple(result)


def storage_uri(raw: str) -> str:
    """memory://, or Redis: redis://, rediss:// (TLS), redis+sentinel://,
    redis+cluster:// (httpcache/redis_uri.py)."""
    from rproxy.httpcache.redis_uri import parse
    value = raw.strip()
    if value == "memory://":
        return value
    if not value.startswith(("redis://", "rediss://", "redis+sentinel://", "redis+cluster://")):
        raise ValueError(f"{raw!r} is not memory://, redis://host:port/db, rediss://, "
                         "redis+sentinel://host:port/service or redis+cluster://host:port,host:port")
    parse(value)
    return value


def cache_storage_uri(raw: str) -> str:
    """A storage_uri, or file:///absolute/dir for the cache's disk store."""
    value = raw.strip()
    if value.startswith("file://"):
        path = value[len("file://"):]
        if not path.startswith("/") or any(ch in path for ch in "\x00\r\n"):
            raise ValueError(f"{raw!r}: a file:// storage names an absolute directory: file:///var/cache/rproxy")
        return value
    if value == "memory://" or value.startswith(("redis://", "rediss://", "redis+")):
        return storage_uri(value)
    raise ValueError(f"{raw!r} is not memory://, file:///path/to/dir or redis://host:port/db "
                     "(or rediss://, redis+sentinel://, redis+cluster://)")


def acme_storage_uri(raw: str) -> str:
    """Empty, or a Redis storage_uri ([acme] has no memory of its own to share)."""
    value = raw.strip()
    if not value:
        return value
    if value.startswith("file://"):
        raise ValueError(f"{raw!r}: for a shared directory, set cache_dir to it (see README, ACME for a fleet)")
    if value == "memory://" or not value.startswith(("redis://", "rediss://", "redis+")):
        raise ValueError(f"{raw!r} is not redis://host:port/db (or rediss://, redis+sentinel://host:port/service, "
                         "redis+cluster://host:port,host:port)")
    return storage_uri(value)


def limit_key(raw: str) -> str:
    """'ip' or 'header:NAME'."""
    value = raw.strip()
    if value == "ip" or (value.lower().startswith("header:") and re.fullmatch(r"[A-Za-z0-9-]+", value[7:])):
        return value
    raise ValueError(f"{raw!r} is not ip or header:NAME")


_TOKEN_RE = re.compile(r"[!#$%&'*+.^`|~0-9A-Za-z_-]+")
# Removing these would break the request itself.
_ESSENTIAL_HEADERS = frozenset({"host", "content-length", "content-type", "transfer-encoding"})


def header_names(raw: str) -> tuple[str, ...]:
    """'X-Client-IP True-Client-IP' -> the names; X_Client_IP is X-Client-IP
    (the WSGI environ cannot tell them apart)."""
    names = []
    for word in words(raw):
        if not _TOKEN_RE.fullmatch(word):
            raise ValueError(f"{word!r} is not a header name")
        if word.lower() in _ESSENTIAL_HEADERS:
            raise ValueError(f"{word} cannot be listed: requests need it")
        names.append(word.replace("_", "-"))
    return tuple(names)


def header_value(raw: str) -> str:
    value = raw.strip()
    if any(ch in value for ch in "\r\n\x00"):
        raise ValueError("a header value cannot hold CR, LF or NUL")
    return value


def base64_secret(raw: str) -> str:
    """A secret in base64 (a TSIG key's, as `tsig-keygen` prints it)."""
    value = raw.strip()
    if not value:
        return ""
    try:
        if not base64.b64decode(value, validate=True):
            raise ValueError
    except (ValueError, binascii.Error):
        raise ValueError("is not base64 (as tsig-keygen prints it)") from None
    return value


def executable_file(raw: str) -> str:
    path = raw.strip()
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a file")
    if not os.access(path, os.X_OK):
        raise ValueError(f"{path!r} is not executable")
    return path
