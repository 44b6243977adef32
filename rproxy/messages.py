"""The request and response value types every handler passes along, and the
proxy's own short answers (404, 413, 502, ...).

A Request is built once from the WSGI environ: the method, the raw target, the
normalised path used for routing, the host, and the headers as they will go
upstream (hop-by-hop headers already removed). A Response is a status, a
header list and an iterable body, so a middleware can read or change any of
them before the WSGI server writes it out.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from http import HTTPStatus
from typing import Any, Iterable

from rproxy.record import of as record_of
from rproxy.target import TargetError
from rproxy.target import parse as parse_target

# RFC 9110 7.6.1: removed in both directions, plus every header Connection names.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})

# Response headers that only describe the upstream hop (the WSGI server adds
# its own Server). Date stays for the cache's sake until the response is
# handed to the WSGI server, which writes its own (see app.py).
_RESPONSE_DROP = HOP_BY_HOP | {"server"}
# What may never pass into a header we send: CR, LF, NUL and other controls but tab.
bad_header_value = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search
valid_header_name = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
valid_host = re.compile(r"(?:[A-Za-z0-9._~-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?").fullmatch
# Methods as gunicorn's HTTP/1 parser takes them (upper-case tokens), so an
# HTTP/2 :method meets the same rule before it becomes a request line.
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://").match
valid_method = re.compile(r"[A-Z0-9!#$%&'*+\-.^_`|~]{1,32}").fullmatch


def clean_response_headers(pairs: Iterable[tuple[str, str]], connection: str | None, chunked: bool,
                           dropped: list[str] | None = None,
                           keep: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """An upstream's response headers as they may go to the client: no
    hop-by-hop headers (but those in `keep`), no Content-Length beside a
    chunked body (it would lie once the chunking is decoded), and nothing
    malformed, which could split the response. Names of malformed headers
    go to `dropped`."""
    drop = _RESPONSE_DROP | connection_tokens(connection) if connection else _RESPONSE_DROP
    if chunked:
        drop = drop | {"content-length"}
    if keep:
        drop = drop - keep
    out = []
    for name, value in pairs:
        if name.lower() in drop:
            continue
        if bad_header_value(value) or not valid_header_name(name):
            if dropped is not None:
                dropped.append(name)
            continue
        out.append((name, value))
    return out


# rproxy's worker puts an HTTP/2 request's :protocol here (no client header
# can have this name: HTTP/2 field names never start with a colon).
EXTENDED_CONNECT = "HTTP_:PROTOCOL"
# And, with [server] preserve_header_case, {X-Api-Key: the client's spelling}
# here (see server/header_case.py).
HEADER_CASE = "HTTP_:HEADER_CASE"


class BadRequest(Exception):
    """The request cannot be served as sent; carries the status to answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@lru_cache(maxsize=2048)
def header_name(environ_key: str) -> str:
    """'HTTP_X_FORWARDED_FOR' -> 'X-Forwarded-For'."""
    return environ_key[5:].replace("_", "-").title()


# environ key -> (header name, its lower case), for the keys requests carry.
_NAMES: dict[str, tuple[str, str]] = {}


def _names(environ_key: str) -> tuple[str, str]:
    if len(_NAMES) > 2048:  # clients choose the names: bounded
        _NAMES.clear()
    name = header_name(environ_key)
    names = _NAMES[environ_key] = (name, name.lower())
    return names


def header_environ_key(name: str) -> str:
    """'X-Api-Key' -> 'HTTP_X_API_KEY'."""
    return "HTTP_" + name.upper().replace("-", "_")


def connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


class Request:
    """One client request, as the proxy sees it."""

    __slots__ = ("environ", "method", "target", "path", "query", "host", "headers",
                 "peer", "client_ip", "scheme", "request_id", "content_length", "chunked",
                 "upgrade", "header_case", "record")

    def __init__(self, environ: dict[str, Any], method: str, target: str, path: str, query: str,
                 host: str, headers: dict[str, str], peer: str, scheme: str,
                 request_id: str, content_length: int | None, chunked: bool,
                 upgrade: str | None = None, header_case: dict[str, str] | None = None):
        self.environ = environ
        self.method = method
        self.target = target          # canonical origin-form path?query, as sent upstream (target.py)
        self.path = path              # decoded, for matching only
        self.query = query
        self.host = host              # lower-case, without port
        self.headers = headers        # to send upstream, Title-Case names
        self.peer = peer              # the TCP peer's address
        self.client_ip = peer         # the real client, once forwarded headers are read
        self.scheme = scheme
        self.request_id = request_id
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade        # the Upgrade header, when Connection asks for it
        # {name in headers: as the client spelled it}, with preserve_header_case
        self.header_case = header_case
        self.record = record_of(environ)  # what the proxy learns of it, for the log and metrics

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.title())

    @classmethod
    def from_environ(cls, environ: dict[str, Any]) -> "Request":
        method = environ["REQUEST_METHOD"]
        if method == "CONNECT" and EXTENDED_CONNECT in environ:
            # RFC 8441, e.g. WebSocket over HTTP/2: the tunnel would need the
            # whole multiplexed connection.
            raise BadRequest(f"protocol upgrades ({environ[EXTENDED_CONNECT]}) need HTTP/1.1; "
                             "extended CONNECT over HTTP/2 is not supported")
        if method == "CONNECT":
            # Tunnelling to a client-chosen host would make us an open proxy.
            raise BadRequest("CONNECT is not served here", 405)
        if not valid_method(method):
            raise BadRequest("malformed method")
        raw = environ.get("RAW_URI", "/")
        authority = None
        absolute = _ABSOLUTE_FORM(raw) if raw[:1] != "/" else None
        if absolute:
            # Absolute form (RFC 9112 3.2.2): its authority replaces Host,
            # and only its path goes upstream, to the route's own servers.
            rest = raw[absolute.end():]
            slash = rest.find("/")
            authority, raw = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
        try:
            target, path, query = parse_target(raw, method)
        except TargetError as e:
            raise BadRequest(str(e)) from None

        connection = environ.get("HTTP_CONNECTION")
        upgrade = None
        if connection:
            tokens = connection_tokens(connection)
            drop = HOP_BY_HOP | tokens
            if "upgrade" in tokens:
                upgrade = environ.get("HTTP_UPGRADE", "").strip() or None
        else:
            drop = HOP_BY_HOP
        if environ.get("SERVER_PROTOCOL", "").startswith("HTTP/2"):
            # gunicorn marks HTTP/2 requests with HTTP_VERSION; no client sent it.
            drop = drop | {"version"}
        header_case = environ.pop(HEADER_CASE, None)  # not a header: out of the loop's way
        headers: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name, lname = _NAMES.get(key) or _names(key)
                if lname not in drop:
                    headers[name] = value
        content_type = environ.get("CONTENT_TYPE")
        if content_type:
            headers["Content-Type"] = content_type
        coding = environ.get("HTTP_TRANSFER_ENCODING")
        chunked = coding is not None
        if coding is not None and coding.strip().lower() != "chunked":
            # gunicorn decodes chunked alone: any other coding would reach the
            # upstream still applied, and be read as something else there.
            raise BadRequest("only the chunked transfer coding is supported", 501)
        length = environ.get("CONTENT_LENGTH")
        content_length = None
        if length and not chunked:
            if not length.isdigit():
                raise BadRequest("malformed Content-Length")
            content_length = int(length)
            headers["Content-Length"] = length
        # gunicorn already answered 100-continue; the upstream gets the body at once.
        headers.pop("Expect", None)

        host = authority if authority is not None else headers.get("Host", "")
        if host:
            if not valid_host(host):
                raise BadRequest("malformed Host")
            headers["Host"] = host
        elif environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
            raise BadRequest("HTTP/1.1 request without Host")
        hostname = host.lower()
        if hostname.endswith("]") or ":" not in hostname:
            hostname = hostname.rstrip(".")
        else:
            hostname = hostname.rsplit(":", 1)[0].rstrip(".")

        request_id = headers.get("X-Request-Id")
        if request_id is None or not _REQUEST_ID_RE.fullmatch(request_id):
            request_id = os.urandom(16).hex()
        headers["X-Request-Id"] = request_id

        return cls(environ, method, target, path, query, hostname, headers,
                   environ.get("REMOTE_ADDR", ""), environ.get("wsgi.url_scheme", "http"),
                   request_id, content_length, chunked, upgrade, header_case)


class Response:
    """A status, headers and a body iterable, on its way to the client."""

    __slots__ = ("status", "reason", "headers", "body", "close_connection")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: Iterable[bytes],
                 reason: str | None = None):
        self.status = status
        self.reason = reason or _reason(status)
        self.headers = headers
        self.body = body
        # The client connection cannot carry another request after this one
        # (e.g. an unread request body is still on the wire).
        self.close_connection = False

    @property
    def status_line(self) -> str:
        return f"{self.status} {self.reason}"

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


def _reason(status: int) -> str:
    if status == 499:
        return "Client Closed Request"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_response(request: Request | None, status: int, message: str,
                   extra_headers: Iterable[tuple[str, str]] = (), environ: dict[str, Any] | None = None) -> Response:
    """The proxy's own answer: short, JSON when the client asks for JSON.

    Without a Request (it could not be built), `environ` supplies the Accept
    header and receives the generated request id."""
    if request is not None:
        request_id, accept = request.request_id, request.headers.get("Accept", "")
    else:
        request_id = os.urandom(16).hex()
        accept = environ.get("HTTP_ACCEPT", "") if environ else ""
        if environ is not None:
            record_of(environ).request_id = request_id
    if "application/json" in accept:
        body = json.dumps({"status": status, "error": message, "request_id": request_id}).encode()
        content_type = "application/json"
    else:
        body = f"{status} {_reason(status)}: {message}\nrequest id: {request_id}\n".encode()
        content_type = "text/plain; charset=utf-8"
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *extra_headers]
    if request is None:
        headers.append(("X-Request-ID", request_id))
    return Response(status, headers, [body])
