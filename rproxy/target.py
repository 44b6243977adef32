"""The request-target: checked against HTTP/1.1's grammar and brought to one
canonical form, which the router, the filter, the cache key, `rproxy explain`
and the upstream all see. A target that has no single reading is refused.

An HTTP/1.1 request line and an HTTP/2 `:path` go through the same rules, so a
field that becomes part of the upstream's request line always meets HTTP/1.1's
grammar. One rule for each ambiguous form:

| form                                   | example                  | rule                                   |
|----------------------------------------|--------------------------|----------------------------------------|
| fragment                               | `/admin#x`               | 400: not part of a request-target (RFC 9112 3.2) |
| byte outside visible ASCII             | `/a b`, `/a\\x01`        | 400 (HTTP/1.1 cannot carry it)         |
| backslash, raw or encoded              | `/\\admin`, `/%5Cadmin`  | 400: IIS-style servers read it as `/`  |
| malformed or control-byte escape       | `/%zz`, `/admin%09`      | 400                                    |
| escaped unreserved character           | `/%61dmin`               | decoded: `/admin` (RFC 3986 6.2.2.2)   |
| other escapes                          | `/a%2fb`                 | kept, hex in upper case: `/a%2Fb`      |
| escaped escape                         | `/%2561dmin`             | 400: servers that decode twice (IIS's rule) |
| empty segments                         | `//admin`                | merged: `/admin`                       |
| dot segments, escaped too              | `/x/../admin`, `/%2e%2e` | resolved (RFC 3986 5.2.4); above the root: 400 |
| dot segment behind escaped slashes     | `/x%2F..%2Fadmin`        | 400: servers that decode `%2F` climb   |
| path parameter on an empty/dot segment | `/;/admin`, `/%2F;/a`    | 400: Tomcat and Jetty resolve them     |
| segment of dots and spaces             | `/...`, `/..%20`         | 400: Windows reads them as `..`        |
| path parameters elsewhere              | `/a;jsessionid=1`        | forwarded; the filter judges `/a`      |
| trailing dots and spaces               | `/admin.`, `/admin%20`   | forwarded; the filter judges `/admin`  |
| `OPTIONS *`                            |                          | forwarded as `*`, routed as `/`        |

Everything else goes upstream byte for byte as the client sent it.
"""

from __future__ import annotations

import re
from urllib.parse import quote


class TargetError(ValueError):
    """The target has no single reading: answer 400 with this message."""


# (as it goes upstream: origin-form path?query, or '*';
#  the decoded path the router and the filter match; the query)
Target = tuple[str, str, str]

# A target whose path is made of these alone, with no empty or dot segment,
# is already canonical: the common case costs one regex match and two
# substring tests (per request, so no object is built either).
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*(?:\?[\x21\x22\x24-\x5b\x5d-\x7e]*)?").fullmatch
# What a request-target may hold at all (RFC 9112 3.2): visible ASCII, no '#'
# (and no backslash, see above).
_REFUSED_CHAR = re.compile(r"[^\x21\x22\x24-\x5b\x5d-\x7e]").search
_ESCAPE = re.compile(r"%(?:([0-9A-Fa-f]{2})|.{0,2})", re.S)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPED_ESCAPE = re.compile(r"[0-9A-Fa-f]{2}").match
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]").search
_DOTS_AND_SPACES = re.compile(r"[.\s]*").fullmatch


def parse(raw: str, method: str = "GET") -> Target:
    """(forward, path, query) of an origin-form request-target, or TargetError."""
    if _PLAIN(raw) and "//" not in raw and "/." not in raw:
        path, _, query = raw.partition("?")
        return raw, path, query
    bad = _REFUSED_CHAR(raw)
    if bad:
        raise TargetError(_why_refused(bad.group()))
    if raw == "*":
        if method != "OPTIONS":
            raise TargetError("the asterisk form is for OPTIONS only")
        return "*", "/", ""
    if raw[:1] != "/":
        raise TargetError("request target is neither a path nor an absolute URL")
    raw_path, separator, query = raw.partition("?")
    forward, path = _canonical_path(raw_path)
    return forward + separator + query, path, query


def _why_refused(char: str) -> str:
    if char == "#":
        return "fragment in the request target"
    if char == "\\":
        return "backslash in the path"
    return f"byte {ord(char):#04x} in the request target"


def _canonical_path(raw_path: str) -> tuple[str, str]:
    """(the path to forward, the decoded path to match) for a path that
    needs more than a look."""
    segments: list[tuple[str, str]] = []   # (as forwarded, decoded)
    raw_segments = raw_path.split("/")[1:]
    for raw_segment in raw_segments:
        forwarded, decoded = _segment(raw_segment)
        if decoded in ("", "."):
            continue
        if decoded == "..":
            if not segments:
                raise TargetError("path climbs above the root")
            segments.pop()
            continue
        name = decoded.split(";", 1)[0]
        if _DOTS_AND_SPACES(name):
            raise TargetError("path parameter on an empty or dot segment" if name != decoded
                              else "path segment of dots and spaces")
        if "/" in decoded:
            # An escaped slash makes segments of its own for an upstream that
            # decodes it: each is judged as a segment is (`%2F;` is `/;`).
            for part in decoded.split("/"):
                part_name = part.split(";", 1)[0]
                if part_name != part and _DOTS_AND_SPACES(part_name):
                    raise TargetError("path parameter on an empty or dot segment behind an escaped slash")
                if part_name and _DOTS_AND_SPACES(part_name):
                    raise TargetError("dot segment behind an escaped slash")
        segments.append((forwarded, decoded))
    last = raw_segments[-1] if raw_segments else ""
    trailing = "/" if segments and _segment(last)[1] in ("", ".", "..") else ""
    forward = "/" + "/".join(f for f, _ in segments) + trailing
    path = "/" + "/".join(d for _, d in segments) + trailing
    if "//" in path:  # escaped slashes next to each other or to a separator
        path = re.sub("/{2,}", "/", path)
    return forward, path


def _segment(raw: str) -> tuple[str, str]:
    """One segment: (escapes of unreserved characters decoded and the others
    upper-cased, fully decoded). Decoding is done once, as the upstream
    will: `%252e` is `%2e`, never `.`."""
    if "%" not in raw:
        return raw, raw
    forwarded: list[str] = []
    decoded = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(raw):
        hex_digits = match.group(1)
        if hex_digits is None:
            raise TargetError("malformed percent-escape in the path")
        plain = raw[pos:match.start()]
        forwarded.append(plain)
        decoded += plain.encode("ascii")
        byte = int(hex_digits, 16)
        if byte == 0x25 and _ESCAPED_ESCAPE(raw, match.end()):
            raise TargetError("escaped percent-escape in the path")
        char = chr(byte)
        forwarded.append(char if char in _UNRESERVED else "%" + hex_digits.upper())
        decoded.append(byte)
        pos = match.end()
    forwarded.append(raw[pos:])
    decoded += raw[pos:].encode("ascii")
    text = decoded.decode("utf-8", "surrogateescape")
    if _CONTROL(text):
        raise TargetError("escaped control byte or backslash in the path")
    return "".join(forwarded), text


def judged(path: str) -> str:
    """The path as the most lenient upstream reads it, for the filter: each
    segment without its path parameters and trailing dots and spaces (Tomcat
    drops `;x`, Windows file systems trailing dots and spaces)."""
    if ";" not in path and "." not in path and " " not in path:
        return path
    return "/".join(segment.split(";", 1)[0].rstrip(". ") for segment in path.split("/"))


def without_prefix(target: str, path: str, query: str, prefix: str) -> str:
    """The target a route that strips `prefix` forwards: nginx-style, the
    matched prefix replaced by '/'."""
    forward_path = target.partition("?")[0]
    if forward_path.startswith(prefix) and forward_path[len(prefix):len(prefix) + 1] in ("", "/"):
        rest = forward_path[len(prefix):] or "/"
    else:
        # The prefix matched only once escapes were decoded (`/api%2Fx`):
        # the decoded rest, escaped again.
        rest = quote(path[len(prefix):] or "/", safe="/:@!$&'()*+,;=-._~", errors="surrogateescape")
        if not rest.startswith("/"):
            rest = "/" + rest
    return f"{rest}?{query}" if query else rest
