"""What the filter judges is what the upstream gets: a corpus of request
targets an attacker tries against `deny = /admin /.git *.php`, each refused or
forwarded as one exact canonical target, over HTTP/1.1 and HTTP/2, with an
upstream that records every request line it receives. No denied resource may
ever reach it, read however leniently (tests/lenient.py)."""

from __future__ import annotations

import lenient
import pytest
from conftest import raw_exchange, single_route
from h2client import RawH2
from recording import recorder  # noqa: F401 (a fixture)

from rproxy.messages import BadRequest, Request
from rproxy.middleware.filter import FilterConfig, PathFilter

DENY = ("/admin", "/.git")
DENY_GLOBS = ("*.php",)
FILTER = "[filter]\ndeny = /admin /.git *.php\n"

# target -> 400 (the proxy refuses the target), 404 (the filter refuses it),
# or the exact target the upstream receives.
CORPUS = {
    # fragments
    "/admin#x": 400, "/.git#/config": 400, "/x.php#.jpg": 400, "/ok#frag": 400, "/ok?q=1#f": 400,
    # path parameters
    "/admin;x": 404, "/admin;": 404, "/x/..;/admin": 400, "/;/admin": 400, "/.;/admin": 400,
    "/x/.;x/admin": 400, "/%2e%2e;/admin": 400, "/..%3b/admin": 400, "/x;a/..;b/admin": 400,
    "/ok/a;jsessionid=1": "/ok/a;jsessionid=1",
    # backslashes, raw and escaped
    "/\\admin": 400, "/x\\..\\admin": 400, "/%5Cadmin": 400, "/x%5c..%5cadmin": 400, "/ok\\": 400,
    # trailing junk and PATH_INFO
    "/admin%20": 404, "/admin%09": 400, "/admin%00": 400, "/admin%0d%0a": 400, "/admin.": 404,
    "/admin..": 404, "/admin%2e": 404, "/admin%20%2e": 404, "/admin./": 404, "/x.php/": 404,
    "/x.php/foo": 404, "/x.php%20": 404, "/x.php.": 404, "/x.php;.jpg": 404, "/a/b.php/c/d": 404,
    "/...": 400, "/x/..%20/admin": 400, "/x/.%20/admin": 400, "/x/%20/admin": 400,
    # case
    "/ADMIN": 404, "/Admin/x": 404, "/.GIT/config": 404, "/X.PHP": 404, "/x.PhP": 404, "/%41DMIN": 404,
    # escapes, once and twice; escaped separators
    "/%61dmin": 404, "/adm%69n": 404, "/%2561dmin": 400, "/%252e%252e/admin": 400, "/%zzadmin": 400,
    "/admin%": 400, "/x%2F..%2Fadmin": 400, "/x%2f%2e%2e%2fadmin": 400, "/admin%2Fx": 404, "/%2Fadmin": 404,
    "/%2f;/admin": 400, "/x%2F;x/admin": 400, "/%2f..;/admin": 400, "/%2F.;x/admin": 400, "/%2f%20;/admin": 400,
    "/ok%2F;x": 400, "/ok/a%2Fb;v=1": "/ok/a%2Fb;v=1",
    # dot segments and empty segments
    "//admin": 404, "/./admin": 404, "/x/../admin": 404, "/x/%2e%2e/admin": 404, "/x/%2E./admin": 404,
    "/..": 400, "/../admin": 400, "/%2e%2e/admin": 400, "/.git./config": 404, "/.git/": 404,
    # bytes HTTP/1.1 cannot carry (over HTTP/2 only: the HTTP/1.1 parser refuses them itself)
    # forwarded, each as exactly one canonical target
    "/ok": "/ok", "/ok/%61b": "/ok/ab", "/ok/a%2fb": "/ok/a%2Fb", "/ok//x/./y/../z": "/ok/x/z",
    "/ok/administrator": "/ok/administrator", "/administrator": "/administrator",
    "/ok?x=/admin": "/ok?x=/admin", "/ok/caf%c3%a9": "/ok/caf%C3%A9", "/ok/%7euser": "/ok/~user",
    "/ok/x.php.txt": "/ok/x.php.txt", "/ok/a%20b": "/ok/a%20b", "/ok/": "/ok/", "/ok/.": "/ok/",
}
# Only over HTTP/2, where :path is not a request line gunicorn parsed.
H2_ONLY = {"/admin x": 400, "/ok HTTP/1.0": 400, "/ok\tx": 400, "/ok\x01": 400, "/ok\x7f": 400,
           "/ok?a b": 400, "/caf\u00e9": 400, "": 400, "ok": 400, "*": 400}


def judged_in_process(target: str):
    """The proxy's own verdict, without a socket: 400, 404 or the forwarded target."""
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": target, "SERVER_PROTOCOL": "HTTP/1.1",
               "HTTP_HOST": "x", "REMOTE_ADDR": "127.0.0.1"}
    try:
        request = Request.from_environ(environ)
    except BadRequest as e:
        return e.status
    path_filter = PathFilter(FilterConfig(name="filter", deny=(*DENY, *DENY_GLOBS)))
    return 404 if path_filter.refuses(request.path) else request.target


@pytest.mark.parametrize("target", sorted({**CORPUS, **H2_ONLY}))
def test_each_target_is_refused_or_forwarded_as_one_canonical_target(target):
    expected = {**CORPUS, **H2_ONLY}[target]
    assert judged_in_process(target) == expected, target
    if isinstance(expected, str):
        assert not lenient.reaches(expected, DENY, DENY_GLOBS), target
        assert judged_in_process(expected) == expected  # canonical: a fixed point


def _status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _check(results: dict, recorder, protocol: str, hardening_record) -> None:
    for target, (status, body) in results.items():
        expected = {**CORPUS, **H2_ONLY}[target]
        if isinstance(expected, str):
            assert (status, body) == (200, b"GET " + expected.encode() + b" HTTP/1.1"), (protocol, target)
        else:
            assert status == expected, (protocol, target, status, body[:200])
    forwarded = [line.decode("latin-1") for line in recorder.lines]
    for line in forwarded:
        method, target, version = line.split(" ")
        assert (method, version) == ("GET", "HTTP/1.1"), line
        assert not lenient.reaches(target, DENY, DENY_GLOBS), line
    assert len(forwarded) == sum(isinstance(v, str) for t, v in {**CORPUS, **H2_ONLY}.items() if t in results)
    refused = sum(1 for t in results if not isinstance({**CORPUS, **H2_ONLY}[t], str))
    hardening_record((f"path filter bypass corpus over {protocol} (fragments, `;`, `\\`, escapes, case, "
                      "trailing dots and spaces, PATH_INFO)", str(len(results)),
                      f"{refused} refused (400 or the filter's 404), {len(forwarded)} forwarded, each as "
                      "its canonical target; none reaches a denied path, read however leniently"))


def test_no_denied_path_reaches_the_upstream_over_http11(start_proxy, recorder, hardening_record):
    proxy = start_proxy(single_route(recorder.port) + FILTER)
    results = {}
    for target in CORPUS:
        response = raw_exchange(proxy.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                .encode("latin-1"))
        results[target] = _status_and_body(response)
    _check(results, recorder, "HTTP/1.1", hardening_record)


def test_no_denied_path_reaches_the_upstream_over_http2(start_proxy, recorder, hardening_record):
    proxy = start_proxy(single_route(recorder.port) + FILTER,
                        server={"http2": "yes", "http2_cleartext": "yes"})
    results = {}
    conn = RawH2(proxy.port)
    for target in {**CORPUS, **H2_ONLY}:
        try:
            reply = conn.response(conn.request("GET", target))
        except ConnectionError:
            # A connection error (e.g. an empty :path, RFC 9113 8.3.1) refuses the stream.
            results[target] = (400, b"")
            conn = RawH2(proxy.port)
            continue
        # So does a stream the HTTP/2 layer resets.
        results[target] = (reply["status"] or 400, reply["body"])
    conn.close()
    _check(results, recorder, "HTTP/2", hardening_record)
