"""Property-based tests: whatever the input, the config loader gives a
config or a precise error, forwarded headers cannot carry a request split,
the filter and the router read a path the same way, and the cache's rules
stay within their bounds."""

from __future__ import annotations

import math

import lenient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rproxy import config, values
from rproxy.client_address import Forwarding
from rproxy.config import ConfigError, addresses
from rproxy.forwarding.forwarder import Forwarder
from rproxy.httpcache import rules
from rproxy.messages import BadRequest, Request, bad_header_value, valid_header_name
from rproxy.middleware.cache import CacheConfig, HTTPCache
from rproxy.middleware.filter import FilterConfig, PathFilter
from rproxy.routing import Router
from rproxy.target import TargetError
from rproxy.target import parse as parse_target

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the config loader -------------------------------------------------------------

from dataclasses import fields as _fields  # noqa: E402

KINDS = {**config.SINGLE_SECTIONS, **config.NAMED_SECTIONS, **config.MIDDLEWARE}
SECTION_NAMES = ["server", "log", "admin", "upstream:app", "upstream:b", "route:r", "route:s", "rate_limit",
                 "filter", "cache", "security_headers", "cache:x", "filter:f", "route:", "upstream", "bogus",
                 "app:main", "DEFAULT", "servre"]
VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "yes", "maybe", "127.0.0.1:1", "http://127.0.0.1:1", "https://h:0",
                     "/", "/a", "a", "3s", "0s", "1k", "10/minute", "nonsense/eon", "redis://127.0.0.1:1/0",
                     "app", "b", "x", "f", "off", "%(x)s", "%", "", "1e9", "99999999999999999999",
                     "*.example.com", "127.0.0.1:1 weight=0", "127.0.0.1:1 max_fails=x", "\t", "json",
                     "moving-window", "404", "ip", "header:X-Key", "/admin *.php", "GET /healthz 200"]),
    st.text(st.characters(blacklist_characters="\r\n"), max_size=20))


def keys_for(section: str) -> list[str]:
    kind = KINDS.get(section.split(":", 1)[0])
    return [f.name for f in _fields(kind) if f.name != "name"] if kind else []


@st.composite
def ini_texts(draw) -> str:
    """Mostly well-formed INI with the real sections and keys, wrong values
    and misspellings mixed in; now and then a line of anything."""
    body: dict[str, dict[str, str]] = {}
    if draw(st.booleans()):  # start from a valid config, so that changes to it are tried too
        body = {"upstream:app": {"servers": "127.0.0.1:1"}, "route:r": {"path": "/", "upstream": "app"}}
    for section in draw(st.lists(st.one_of(st.sampled_from(SECTION_NAMES), st.text(max_size=8)),
                                 unique=True, max_size=5)):
        keys = draw(st.lists(st.sampled_from(keys_for(section) + ["x", "upstrem", "%(a)s"]),
                             unique=True, max_size=4))
        body.setdefault(section, {}).update({key: draw(VALUES) for key in keys})
    lines = []
    for section, pairs in body.items():
        lines.append(f"[{section}]")
        lines += [f"{key} {draw(st.sampled_from(['=', '=', ':']))} {value}" for key, value in pairs.items()]
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=40)))
    return "\n".join(lines)


@FUZZ
@given(text=ini_texts())
def test_any_ini_text_gives_a_config_or_a_precise_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("ini") / "fuzz.ini"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    try:
        loaded = config.load(str(path))
    except ConfigError as e:
        assert e.path == str(path) and e.problem and "Traceback" not in str(e)
    else:
        assert loaded.routes  # a valid config routes somewhere


@FUZZ
@given(raw=st.text(max_size=20))
def test_value_parsers_give_a_value_or_a_value_error(raw):
    for parse in (values.duration, values.size, values.boolean, values.count, values.words,
                  addresses.networks, values.path_prefix, addresses.host_patterns, addresses.servers,
                  values.limits, values.path_patterns, values.storage_uri, values.limit_key,
                  values.header_value, addresses.host_port, values.statuses, values.health_check,
                  values.between(values.size, 256, 8192, " bytes")):
        try:
            parse(raw)
        except ValueError as e:
            assert str(e)


# --- headers ---------------------------------------------------------------------------

HEADER_NAMES = st.one_of(st.sampled_from(["HOST", "X_FORWARDED_FOR", "X_FORWARDED_HOST", "X_FORWARDED_PROTO",
                                          "X_REQUEST_ID", "CONNECTION", "UPGRADE", "X_REAL_IP", "FORWARDED",
                                          "TRANSFER_ENCODING", "TE", "KEEP_ALIVE", "COOKIE"]),
                         st.text(min_size=1, max_size=12))
HEADER_VALUES = st.one_of(st.text(max_size=40),
                          st.sampled_from(["a.example", "evil.example\r\nX-Injected: 1", "1.2.3.4, 5.6.7.8",
                                           "upgrade, x-foo", "chunked", "https", "javascript:", "\x00",
                                           "a\nb", "[::1]:80", "x" * 200]))


class _Route:
    connect_timeout = read_timeout = None
    strip_prefix = False
    path = "/"
    host_header = "client"
    upgrade = ("websocket",)
    idle_timeout = 1.0
    allow_trace = False


class _Upstream:
    class config:
        retries = 1
        retry_timeout = 1.0
        fail_status = frozenset()
        connect_timeout = read_timeout = 1.0
    name = "app"


class _Server:
    label = "127.0.0.1:9"


FORWARDER = Forwarder(_Route(), _Upstream(), config.ServerConfig(), tunnels=None)


@FUZZ
@given(headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=8),
       peer=st.sampled_from(["127.0.0.1", "203.0.113.9"]),
       target=st.sampled_from(["/", "/a?b=c", "http://h.example/x", "*", "/%2e%2e/x"]))
def test_no_forwarded_header_can_split_the_upstream_request(headers, peer, target):
    environ = {"REQUEST_METHOD": "GET", "RAW_URI": target, "REMOTE_ADDR": peer,
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http"}
    environ.update({"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()})
    try:
        request = Request.from_environ(environ)
    except BadRequest as e:
        assert 400 <= e.status < 600
        return
    Forwarding(addresses.networks("127.0.0.1")).apply(request)
    sent = FORWARDER._headers(request, _Server())
    for name, value in sent.items():
        assert valid_header_name(name), name
        assert not bad_header_value(value), (name, value)
        assert name.lower() not in ("connection", "upgrade", "te", "keep-alive", "transfer-encoding")
    host = sent.get("X-Forwarded-Host")
    if host is not None:
        assert "\r" not in host and "\n" not in host and " " not in host.replace(", ", ",")
    assert sent.get("X-Forwarded-Proto", "http") in ("http", "https")
    assert request.client_ip and "," not in request.client_ip


# --- paths: the filter judges what the upstream gets ---------------------------------------

PATH_PIECES = st.sampled_from(["/", "admin", "Admin", "ADMIN", "%61dmin", "%2e", "%2E%2E", ".", "..", ";",
                               ";x=1", "%2f", "%252e", "x", "%00", "//", "%", "%zz", "admin.", "adm%69n",
                               "\\", "%5c", "~", "?", "#", "..;", ";/", "%20", ".%20", "%2561", "%09",
                               "x.php", "X.PHP", "%3b", "%2F..%2F", "%c3%a9"])


@FUZZ
@given(pieces=st.lists(PATH_PIECES, min_size=1, max_size=8), case_insensitive=st.booleans())
def test_the_filter_judges_the_path_the_router_and_the_upstream_get(pieces, case_insensitive):
    raw = "/" + "".join(pieces)
    try:
        forward, path, query = target = parse_target(raw)
    except TargetError:
        return  # refused before anything looks at it
    # Canonical: the forwarded target reads the same again, at the upstream too.
    assert parse_target(forward) == target, raw
    router = Router([((), "/", "public"), ((), "/admin", "admin")])
    denied = PathFilter(FilterConfig(name="", deny=("/admin", "*.php"), case_insensitive=case_insensitive))
    if router.match("h", path).target == "admin":
        assert denied.refuses(path), (raw, target)
    if case_insensitive and lenient.reaches(forward, ("/admin",), ("*.php",)):
        assert denied.refuses(path), (raw, target)
    # Decoded once, as the upstream will (never twice): no dot or empty segments left.
    segments = path.split("/")[1:]
    assert path.startswith("/") and "\x00" not in path
    assert not any(seg in (".", "..") for seg in segments) and "" not in segments[:-1], (raw, target)


# --- the cache's rules --------------------------------------------------------------------

DIRECTIVES = st.lists(st.sampled_from(["max-age=60", "max-age=0", "max-age=-1", "max-age=abc", "s-maxage=5",
                                       "no-store", "no-cache", "private", "public", "must-revalidate",
                                       "max-age=99999999999999999999", "max-age=\"30\"", "stale", ""]),
                      max_size=4).map(", ".join)
DATES = st.sampled_from(["Sun, 29 Nov 2026 12:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "garbage",
                         "Fri, 31 Dec 9999 23:59:59 GMT", "0", ""])
AGES = st.sampled_from(["0", "10", "-5", "1e3", "0, 5", "abc", "99999999999"])


@st.composite
def stored_responses(draw) -> rules.Entry:
    headers = [("Cache-Control", draw(DIRECTIVES))]
    for name, strategy in (("Date", DATES), ("Expires", DATES), ("Last-Modified", DATES), ("Age", AGES),
                           ("Surrogate-Control", DIRECTIVES), ("ETag", st.sampled_from(['"a"', 'W/"a"']))):
        if draw(st.booleans()):
            headers.append((name, draw(strategy)))
    stamp = 1_795_000_000.0
    return rules.Entry(draw(st.sampled_from([200, 203, 301, 404, 500])), "R", headers, b"body",
                       stamp, stamp + draw(st.floats(0, 5)))


@FUZZ
@given(entry=stored_responses(), request_cc=DIRECTIVES, later=st.floats(0, 1e6))
def test_cache_freshness_is_bounded_and_never_fails(entry, request_cc, later):
    lifetime = entry.freshness_lifetime()
    assert lifetime >= 0 and math.isfinite(lifetime)
    now = entry.response_time + later
    assert entry.age(now) >= 0
    request_headers = {"Cache-Control": request_cc} if request_cc else {}
    fresh = rules.fresh_enough(entry, request_headers, now)
    if "no-cache" in rules.directives(request_cc) or "no-cache" in entry.cache_control():
        assert not fresh
    if fresh and "max-stale" not in rules.directives(request_cc):
        assert entry.age(now) < lifetime


@FUZZ
@given(cc=DIRECTIVES, authorization=st.booleans(), method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]))
def test_nothing_marked_no_store_or_private_is_stored(cc, authorization, method):
    request_headers = {"Authorization": "Bearer x"} if authorization else {}
    ok, _ = rules.storable(method, request_headers, 200, [("Cache-Control", cc)])
    parsed = rules.directives(cc)
    if "no-store" in parsed or "private" in parsed or method not in ("GET", "HEAD"):
        assert not ok
    if authorization and not ({"public", "s-maxage", "must-revalidate"} & parsed.keys()):
        assert not ok


@FUZZ
@given(value=st.text(alphabet=st.sampled_from([*'max-ge=0123456789,; "?*.&()', "\\", "\t", "\u0663"]),
                     max_size=30))
def test_targeted_fields_parse_or_are_ignored_never_fail(value):
    parsed = rules.targeted_directives(value)
    if parsed is not None:
        for name in rules.DELTA_DIRECTIVES & parsed.keys():
            assert parsed[name].lstrip("-").isascii() and parsed[name].lstrip("-").isdigit()
    headers = [("Cache-Control", "no-store"), ("CDN-Cache-Control", value)]
    directives, used = rules.response_directives(headers, ("CDN-Cache-Control",))
    assert used is None or parsed is not None


@FUZZ
@given(cc=DIRECTIVES, credential=st.sampled_from(["Cookie", "Authorization"]), lm=DATES)
def test_no_guessed_freshness_for_requests_with_credentials(cc, credential, lm):
    ok, _ = rules.storable("GET", {credential: "x"}, 200, [("Cache-Control", cc), ("Last-Modified", lm)])
    parsed = rules.directives(cc)
    if ok:
        assert {"max-age", "s-maxage", "public", "no-cache"} & parsed.keys()


@FUZZ
@given(vary=st.sampled_from(["Accept-Encoding", "Accept-Encoding, Cookie", "*", ""]),
       first=st.sampled_from(["gzip", "br", "gzip,  br", None]), second=st.sampled_from(["gzip", "br", None]))
def test_a_stored_variant_answers_only_requests_it_was_stored_for(vary, first, second):
    stored_for = {"Accept-Encoding": first} if first is not None else {}
    headers = [("Vary", vary)] if vary else []
    entry = rules.Entry(200, "OK", headers, b"", 0.0, 0.0, rules.vary_keys(headers, stored_for))
    asking = {"Accept-Encoding": second} if second is not None else {}
    if rules.selects(entry, asking) and "Accept-Encoding" in vary:
        assert (first and " ".join(first.split())) == second or (first is None and second is None)


TARGETS = st.sampled_from(["/", "/a", "/a?b=1", "/a?b=2", "/A", "/a/", "/%61", "/a?b=1&c=2", "/a?c=2&b=1",
                           "/a%2Fb", "/a/b", "/a%2fb", "//a", "/x/../a"])


@FUZZ
@given(first=st.tuples(st.sampled_from(["http", "https"]), st.sampled_from(["shop.example", "SHOP.example",
                                                                            "other.example", "shop.example:8080"]),
                        TARGETS),
       second=st.tuples(st.sampled_from(["http", "https"]), st.sampled_from(["shop.example", "other.example"]),
                        TARGETS))
def test_cache_keys_are_equal_exactly_for_the_same_resource(first, second):
    cache = HTTPCache(CacheConfig(name=""), {})

    def key(scheme, host, target):
        return cache._key(Request.from_environ({
            "REQUEST_METHOD": "GET", "RAW_URI": target, "REMOTE_ADDR": "203.0.113.1", "HTTP_HOST": host,
            "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": scheme}))
    # The target is the key as forwarded (target.py): /a and /%61 are one resource
    # (RFC 3986 6.2.2.2) and reach the upstream as the same /a.
    same = (first[0] == second[0] and first[1].lower() == second[1].lower()
            and parse_target(first[2])[0] == parse_target(second[2])[0])
    assert (key(*first) == key(*second)) == same
