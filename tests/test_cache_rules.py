"""The cache's rules (rproxy/httpcache/rules.py) in process, with an injected
clock: Age and Expires as RFC 9111 5.1 and 5.3 read them, HTTP-dates as
RFC 9110 5.6.7 writes them, must-understand, targeted fields (RFC 9213),
and no guessed freshness for requests with credentials."""

import pytest

from rproxy.httpcache import rules

NOW = 1_795_000_000.0  # Sun, 19 Nov 2026 10:13:20 GMT
DATE = "Sun, 22 Nov 2026 10:13:20 GMT"
STAMP = rules.http_date(DATE)
CDN = ("CDN-Cache-Control",)


def entry(*headers, status=200, targets=()):
    return rules.Entry(status, "R", [("Date", DATE), *headers], b"x", STAMP, STAMP, {}, targets)


def fresh(stored, request=None, after=0.0):
    return rules.fresh_enough(stored, request or {}, STAMP + after)


def stored(headers, status=200, request=None, targets=()):
    return rules.storable("GET", request or {}, status, [("Date", DATE), *headers], targets)[0]


# --- Age (RFC 9111 5.1) ---------------------------------------------------------------------

@pytest.mark.parametrize("age, is_fresh", [
    ("abc", True), ("-7200", True), ("7200.0", True), ("7200;foo=bar", True),  # invalid: ignored
    ("7200, 0", False), ("0, 7200", True), ("0, 0", True),                     # a list: its first member
    ("2147483647", False), ("2147483648", False), ("99999999999999999999", False),
    ("٣", True),                                                                # not an ASCII digit
])
def test_age_header_is_read_by_its_first_member_and_ignored_when_invalid(age, is_fresh):
    assert fresh(entry(("Cache-Control", "max-age=3600"), ("Age", age))) is is_fresh


@pytest.mark.parametrize("lines, is_fresh", [(("7200", "0"), False), (("0", "7200"), True),
                                             (("0", "0"), True), (("3600", "3600"), True)])
def test_several_age_lines_count_by_the_first(lines, is_fresh):
    stored_entry = entry(("Cache-Control", "max-age=10000" if lines == ("3600", "3600") else "max-age=3600"),
                         *(("Age", line) for line in lines))
    assert fresh(stored_entry) is is_fresh


def test_a_huge_age_is_capped_not_overflowing():
    assert rules.age_value([("Age", "9" * 40)]) == 2 ** 31
    assert entry(("Age", "9" * 40)).age(STAMP) == 2 ** 31


# --- HTTP-date and Expires (RFC 9110 5.6.7, RFC 9111 5.3) ---------------------------------------

@pytest.mark.parametrize("value", [
    "Thu, 18 Aug 2050 02:01:18 GMT", "THU, 18 AUG 2050 02:01:18 gMT",   # names in any case
    "Thursday, 18-Aug-50 02:01:18 GMT", "Thu Aug 18 02:01:18 2050",     # the obsolete forms
])
def test_the_three_http_date_forms_are_read(value):
    assert rules.http_date(value, NOW) == 2544400878.0


def test_rfc850_two_digit_year_more_than_50_years_ahead_is_the_past_century():
    assert rules.http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW) == 784111777.0
    assert rules.http_date("Sun Nov  6 08:49:37 1994") == 784111777.0


@pytest.mark.parametrize("value", [
    "0", "-1", "garbage", "Thu, 18 Aug 2050 02:01:18 UTC", "Thu, 18 Aug 2050 02:01:18 AEST",
    "Thu, 18 Aug 50 02:01:18 GMT", "Thu 18 Aug 2050 02:01:18 GMT", "Thu, 18  Aug  2050 02:01:18 GMT",
    "Thu, 18-Aug-2050 02:01:18 GMT", "Thu, 18 Aug 2050 02.01.18 GMT", "Thu, 18 Aug 2050 2:01:18 GMT",
    "Thu, 31 Feb 2050 02:01:18 GMT", "Thu, 18 Aug 2050 25:01:18 GMT", "Thu, 18 Abc 2050 02:01:18 GMT",
])
def test_an_invalid_expires_means_already_expired(value):
    assert rules.http_date(value) is None
    stale = entry(("Expires", value))
    assert stale.freshness_lifetime() == 0.0 and not fresh(stale)
    assert stored([("Expires", value)])  # stored (it may be revalidated), never served fresh


def test_far_future_expires_are_fresh():
    for value in ("Tue, 19 Jan 2038 14:14:08 GMT", "Sun, 21 Nov 2286 04:46:39 GMT"):
        assert fresh(entry(("Expires", value)), after=3600)


def test_several_expires_lines_are_invalid_so_expired():
    value = "Thu, 18 Aug 2050 02:01:18 GMT"
    assert not fresh(entry(("Expires", value), ("Expires", value)))


def test_expires_counts_from_the_stored_date_with_an_injected_clock():
    stored_entry = entry(("Expires", "Sun, 22 Nov 2026 10:14:20 GMT"))  # Date + 60 s
    assert stored_entry.freshness_lifetime() == 60.0
    assert fresh(stored_entry, after=59) and not fresh(stored_entry, after=61)


# --- what is stored: interim responses, must-understand ---------------------------------------

@pytest.mark.parametrize("status", [100, 102, 103])
def test_interim_responses_are_never_stored(status):
    assert not stored([("Cache-Control", "max-age=3600")], status=status)


def test_must_understand_overrides_no_store_for_a_status_this_cache_implements():
    cc = [("Cache-Control", "max-age=3600, no-store, must-understand")]
    assert stored(cc, status=200)
    assert not stored(cc, status=599)
    assert not stored([("Cache-Control", "max-age=3600, no-store")], status=200)


# --- targeted fields (RFC 9213) --------------------------------------------------------------

@pytest.mark.parametrize("value, parsed", [
    ("max-age=3600", {"max-age": "3600"}),
    ("foobar, max-age=3600", {"foobar": None, "max-age": "3600"}),
    ("max-age=1;x=y,  private", {"max-age": "1", "private": None}),
    ('max-age="10000"', {}),                       # wrong type: the directive is dropped
    ("max-age=1.5, s-maxage=tok", {}),
    ("no-store=?0", {}),                           # a false boolean is no directive
    ("max-age=10000, &&&&&", None), ("MaX-aGe=3600", None), ("max-age =100", None),
    ("max-age= 100", None), ("max-age=1,", None), ('a="unterminated', None),
])
def test_targeted_fields_are_structured_field_dictionaries(value, parsed):
    assert rules.targeted_directives(value) == parsed


def test_targeted_field_replaces_cache_control_and_expires():
    expires = ("Expires", "Sun, 22 Nov 2026 13:00:00 GMT")
    long_cdn = entry(("Cache-Control", "max-age=1"), ("CDN-Cache-Control", "max-age=3600"), targets=CDN)
    assert fresh(long_cdn, after=60)
    short_cdn = entry(("Cache-Control", "max-age=3600"), ("CDN-Cache-Control", "max-age=1"), expires, targets=CDN)
    assert not fresh(short_cdn, after=60)
    past = entry(("CDN-Cache-Control", "max-age=3600"), ("Expires", "0"), targets=CDN)
    assert fresh(past, after=60)
    no_cache = entry(("CDN-Cache-Control", "no-cache"), ("Cache-Control", "max-age=10000"), expires, targets=CDN)
    assert not fresh(no_cache)


def test_targeted_field_decides_what_is_stored():
    assert stored([("Cache-Control", "no-store"), ("CDN-Cache-Control", "max-age=10000")], targets=CDN)
    assert not stored([("Cache-Control", "max-age=10000"), ("CDN-Cache-Control", "no-store")], targets=CDN)
    assert not stored([("Cache-Control", "max-age=10000"), ("CDN-Cache-Control", "private")], targets=CDN)
    # Not listed in targeted_fields: an ordinary header, Cache-Control decides.
    assert stored([("Cache-Control", "max-age=10000"), ("CDN-Cache-Control", "no-store")])


def test_invalid_or_empty_targeted_field_is_ignored_and_the_next_one_counts():
    targets = ("rproxy-Cache-Control", "CDN-Cache-Control")
    headers = [("Cache-Control", "no-store"), ("rproxy-Cache-Control", "max-age=10, &&"),
               ("CDN-Cache-Control", "max-age=60")]
    directives, used = rules.response_directives(headers, targets)
    assert (directives, used) == ({"max-age": "60"}, "CDN-Cache-Control")
    headers[1] = ("rproxy-Cache-Control", "  ")
    assert rules.response_directives(headers, targets)[1] == "CDN-Cache-Control"
    headers[1] = ("rproxy-Cache-Control", "no-store")
    assert not stored(headers[1:], targets=targets)
    assert rules.response_directives([("Cache-Control", "max-age=5"), ("CDN-Cache-Control", "&")],
                                     CDN) == ({"max-age": "5"}, None)


def test_a_huge_targeted_max_age_is_capped():
    assert entry(("CDN-Cache-Control", "max-age=99999999999"), targets=CDN).freshness_lifetime() == 2 ** 31


# --- no guessed freshness for credentials (RFC 9111 3.5, 4.2.2) ---------------------------------

LAST_MODIFIED = ("Last-Modified", "Sun, 01 Nov 2026 10:13:20 GMT")


@pytest.mark.parametrize("credentials", [{"Cookie": "session=1"}, {"Authorization": "Bearer x"}])
def test_heuristic_freshness_is_never_used_for_a_request_with_credentials(credentials):
    assert stored([LAST_MODIFIED])
    assert not stored([LAST_MODIFIED], request=credentials)
    ok, why = rules.storable("GET", credentials, 200, [LAST_MODIFIED])
    assert why.endswith(next(iter(credentials)))  # Authorization is refused earlier still (3.5)


@pytest.mark.parametrize("explicit", ["max-age=60", "s-maxage=60", "public"])
def test_explicitly_cacheable_responses_to_cookie_requests_are_stored(explicit):
    assert stored([("Cache-Control", explicit), LAST_MODIFIED], request={"Cookie": "a=1"})
    assert stored([("Expires", "Sun, 22 Nov 2026 11:00:00 GMT")], request={"Cookie": "a=1"})


@pytest.mark.parametrize("cc, ok", [("max-age=60", False), ("public, max-age=60", True), ("s-maxage=60", True),
                                    ("must-revalidate, max-age=60", True), ("public", True)])
def test_authorization_needs_public_s_maxage_or_must_revalidate(cc, ok):
    assert stored([("Cache-Control", cc), LAST_MODIFIED], request={"Authorization": "Bearer x"}) is ok


# --- the cache key, as `rproxy explain` shows it ------------------------------------------------

def test_explain_shows_the_cache_key_when_a_cache_applies(tmp_path):
    from rproxy import config
    from rproxy.explain import explain
    ini = tmp_path / "rproxy.ini"
    ini.write_text("[upstream:app]\nservers = 127.0.0.1:9\n[route:default]\nupstream = app\n"
                   "[route:live]\npath = /live\nupstream = app\ncache = off\n[cache]\n")
    loaded = config.load(str(ini))
    code, text = explain(loaded, "http://Shop.Example:8080/a/../b/%7euser?q=1")
    assert code == 0
    assert "  cache key  http://shop.example:8080/b/~user?q=1" in text.splitlines()
    assert "cache key" not in explain(loaded, "http://shop.example/live/x")[1]


# --- the copy the cache keeps of a body passing through (httpcache/bodies.py) -----------------

@pytest.mark.parametrize("length", [None, 6])
def test_a_copy_is_kept_whole_and_handed_over_before_the_last_chunk_when_its_length_is_known(length):
    from rproxy.httpcache.bodies import Tee
    handed: list = []
    tee = Tee([b"abc", b"def"], 100, handed.append, length)
    assert next(tee) == b"abc" and handed == []
    assert next(tee) == b"def"
    assert handed == ([b"abcdef"] if length else [])  # a sized body is stored before its end goes out
    assert list(tee) == [] and handed == [b"abcdef"]
    tee.close()
    assert handed == [b"abcdef"]  # once


@pytest.mark.parametrize("body,limit,close_early", [([b"abc", b"def"], 4, False), ([b"abc", b"def"], 100, True)])
def test_no_copy_of_a_body_too_large_or_not_read_to_its_end(body, limit, close_early):
    from rproxy.httpcache.bodies import Tee
    handed: list = []
    tee = Tee(body, limit, handed.append, 6)
    next(tee)
    if not close_early:
        list(tee)
    tee.close()
    assert handed == [None]
