"""An HTTP/2 request before the application sees it: over gunicorn's
limits (answered per stream, the connection kept), and framed the way an
HTTP/1.1 upstream will need it (cookie crumbs joined, a body's length or
chunked coding said)."""

from __future__ import annotations

from typing import Any


def over_limits(cfg: Any, headers: list[tuple[str, str]]) -> tuple[int, str] | None:
    """(status, message) when a request head is over gunicorn's limits on
    the request line and fields (the checks of its HTTP2Request), else None."""
    fields = 0
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 32  # as RFC 9113 6.5.2 counts it
        if name.startswith(":"):
            if name == ":path" and cfg.limit_request_line and len(value) > cfg.limit_request_line:
                return 414, "request target too long"
            continue
        fields += 1
        if cfg.limit_request_field_size and len(name) + len(value) + 2 > cfg.limit_request_field_size:
            return 431, "request header field too large"
    if cfg.limit_request_fields and fields > cfg.limit_request_fields:
        return 431, f"more than {cfg.limit_request_fields} request header fields"
    if cfg.http2_max_header_list_size and size > cfg.http2_max_header_list_size:
        return 431, f"request header section over {cfg.http2_max_header_list_size} bytes"
    return None


def http1_framing(req: Any) -> None:
    """What an HTTP/1.1 upstream needs to see of an HTTP/2 request.

    Cookie crumbs are joined with "; " (RFC 9113 8.2.3), not with the ","
    gunicorn uses for repeated fields. A body without content-length (HTTP/2
    has no chunked coding) is given its length when it is all in already,
    else it is marked chunked, which is how it will go upstream. An extended
    CONNECT's :protocol is kept where the app can see it."""
    protocol = req.stream.get_pseudo_headers().get(":protocol")
    if protocol is not None:  # extended CONNECT: the app refuses it (see http.EXTENDED_CONNECT)
        req.headers.append((":PROTOCOL", protocol))
    cookies = [value for name, value in req.headers if name == "COOKIE"]
    if len(cookies) > 1:
        req.headers = [h for h in req.headers if h[0] != "COOKIE"] + [("COOKIE", "; ".join(cookies))]
    if req.get_header("CONTENT-LENGTH") is None:
        stream = req.stream
        if not stream.body_complete:
            req.headers.append(("TRANSFER-ENCODING", "chunked"))
        elif stream.body_size:
            req.headers.append(("CONTENT-LENGTH", str(stream.body_size)))
