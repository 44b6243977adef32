"""The worker's response writer (rproxy/server/response_writer.py): the
fields gunicorn kept as they were are remembered, and a response carrying
them again gets exactly what gunicorn's own checks would give it."""

import pytest
from gunicorn.config import Config
from gunicorn.http import message, unreader
from test_canaries import GUNICORN_RESPONSE

from rproxy.server import response_writer
from rproxy.server.response_writer import Response

CONFIG = Config()
REQUEST = message.Request(CONFIG, unreader.IterUnreader(iter([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])),
                          ("127.0.0.1", 1))


def ours(fields):
    response = Response(REQUEST, None, CONFIG)
    response.process_headers(fields)
    return response


def gunicorns(fields):
    response = GUNICORN_RESPONSE(REQUEST, None, CONFIG)
    response.process_headers(fields)
    return response


@pytest.fixture(autouse=True)
def empty_memo():
    response_writer._kept.clear()
    response_writer._seen.clear()
    yield
    response_writer._kept.clear()
    response_writer._seen.clear()


STORED = [("Content-Type", "text/plain"), ("Content-Length", "100"), ("Cache-Control", "max-age=600"),
          ("Date", "Mon, 30 Nov 2026 23:00:00 GMT"), ("ETag", '"abc"'), ("Connection", "close"),
          ("X-Padded", "  1\t"), ("Server", "origin"), ("Upgrade", "websocket"), ("Vary", "Accept-Encoding")]


def test_a_response_sent_again_gets_what_gunicorns_checks_give_it():
    for _ in range(4):  # the memo takes a field the second time it passes
        response, expected = ours(STORED), gunicorns(STORED)
        assert response.headers == expected.headers
        assert response.response_length == expected.response_length == 100
        assert response.upgrade == expected.upgrade
        assert response._date == "Mon, 30 Nov 2026 23:00:00 GMT"
    assert ("Content-Type", "text/plain") in response_writer._kept


def test_fields_gunicorn_changes_drops_or_reads_are_never_remembered():
    for _ in range(4):
        ours(STORED)
    kept = {name.lower() for name, _ in response_writer._kept}
    assert kept == {"content-type", "cache-control", "etag", "vary"}
    # Content-Length is read into the response on every response, not remembered
    assert ours([("Content-Length", "7")]).response_length == 7


@pytest.mark.parametrize("bad", [("X-A", "1\r\nSet-Cookie: x=1"), ("X-A", "1\n"), ("X-A", "\x00"), ("X A", "1"),
                                 ("X-A:", "1"), (b"X-A", "1"), ("X-A", 1), ["X-A", ["1"]]])
def test_a_malformed_field_is_refused_every_time_beside_remembered_ones(bad):
    good = [("X-A", "1"), ("Content-Type", "text/plain")]
    for _ in range(3):
        ours(good)
        with pytest.raises(Exception) as ours_error:
            ours([*good, bad])
        with pytest.raises(Exception) as theirs:
            gunicorns([*good, bad])
        assert type(ours_error.value) is type(theirs.value)


def test_fields_that_differ_on_every_response_do_not_fill_the_memo():
    for i in range(5000):
        response = ours([("Content-Type", "text/plain"), ("X-Request-Id", f"{i:032x}")])
        assert response.headers[-1] == ("X-Request-Id", f"{i:032x}")
    assert response_writer._kept == {("Content-Type", "text/plain")}
    assert len(response_writer._seen) <= response_writer._MEMO_SIZE


def test_the_memo_is_bounded_and_long_values_stay_out_of_it():
    for i in range(3 * response_writer._MEMO_SIZE):
        for _ in range(2):
            ours([("X-N", str(i))])
    assert len(response_writer._kept) <= response_writer._MEMO_SIZE
    long = ("X-Long", "v" * (response_writer._MEMO_VALUE + 1))
    for _ in range(3):
        assert ours([long]).headers == [long]
    assert long not in response_writer._kept and long not in response_writer._seen
