"""HTTP/2 fields become an HTTP/1.1 request line and headers upstream: each
must meet HTTP/1.1's grammar first, or the stream is refused (400, or reset
by the HTTP/2 layer) and the upstream gets nothing. The same rules hold for
HTTP/1.1 clients."""

from __future__ import annotations

from conftest import raw_exchange, single_route
from h2client import RawH2
from recording import recorder  # noqa: F401 (a fixture)

LONG_HOST = "a" * 5000 + ".example"


def h2_reply(port: int, method: str, path: str, authority: str | None = None, headers=()) -> int:
    """The stream's status; 400 for a stream or connection the HTTP/2 layer refused."""
    conn = RawH2(port)
    if authority is not None:
        conn.authority = authority
    try:
        reply = conn.response(conn.request(method, path, headers=headers))
    except ConnectionError:
        return 400
    finally:
        conn.close()
    return reply["status"] or 400


REFUSED = [
    ("GET", "/pub HTTP/1.0", None, ()),            # a second protocol in the request line
    ("GET", "/pub x", None, ()),
    ("GET", "/pub\tx", None, ()),
    ("GET", "/pub\x01", None, ()),
    ("GET", "/pub\x7f", None, ()),
    ("GET", "/pub?a=b c", None, ()),
    ("get", "/pub", None, ()),                     # HTTP/1.1's parser takes upper-case methods only
    ("Get", "/pub", None, ()),
    ("GET /x", "/pub", None, ()),
    ("G\x01T", "/pub", None, ()),
    ("GET", "/pub", "bad host", ()),
    ("GET", "/pub", "a@b.example", ()),
    ("GET", "/pub", "b.example\x01", ()),
    ("GET", "/pub", "b.example:99999x", ()),
    ("GET", "/pub", LONG_HOST, ()),
    ("GET", "/pub", "[::1", ()),
    ("GET", "/pub", None, (("x-a", "v\x01"),)),
    ("GET", "/pub", None, (("x-a", "v\r\nX-Injected: 1"),)),
]


def test_http2_fields_that_http11_cannot_carry_are_refused(start_proxy, recorder, hardening_record):
    proxy = start_proxy(single_route(recorder.port), server={"http2": "yes", "http2_cleartext": "yes"})
    answers = {case: h2_reply(proxy.port, *case) for case in REFUSED}
    assert {case: status for case, status in answers.items() if status != 400} == {}
    assert recorder.lines == []
    # Well-formed requests are served as usual.
    assert h2_reply(proxy.port, "GET", "/pub") == 200
    assert recorder.lines == [b"GET /pub HTTP/1.1"]
    hardening_record(("HTTP/2 fields HTTP/1.1 cannot carry: spaces, controls or a second version in :path, "
                      "lower-case :method, malformed or 5,000-character :authority, control bytes in values",
                      str(len(REFUSED)), "400 or a stream reset for each; nothing reached the upstream"))


def test_a_host_too_long_to_be_a_name_is_refused_over_http11(start_proxy, recorder):
    proxy = start_proxy(single_route(recorder.port))
    reply = raw_exchange(proxy.port, f"GET /pub HTTP/1.1\r\nHost: {LONG_HOST}\r\nConnection: close\r\n\r\n"
                         .encode())
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
    reply = raw_exchange(proxy.port, b"get /pub HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply[:100]
    assert recorder.lines == []
