"""The per-request record: filled once, read by the access log, gunicorn's
own log format, Server-Timing and the metrics (in-process)."""

import json
import re
import time

from rproxy.app import server_timing
from rproxy.messages import Request, error_response
from rproxy.record import KEY, RequestRecord, of
from rproxy.server.accesslog import FACTS, environ_atoms, json_line, line


def environ(**extra) -> dict:
    return {"REQUEST_METHOD": "GET", "RAW_URI": "/a?b=1", "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "example.test", "HTTP_USER_AGENT": "ua",
            "wsgi.url_scheme": "http", **extra}


def answered() -> RequestRecord:
    return RequestRecord(client="203.0.113.7", request_id="rid-1", route="default", upstream="app",
                         server="127.0.0.1:9001", upstream_ms=12.345, cache="MISS", cache_ms=0.5)


def test_a_request_and_its_environ_share_one_record():
    env = environ()
    request = Request.from_environ(env)
    request.record.route = "r"
    assert env[KEY] is request.record and of(env).route == "r"


def test_a_request_that_could_not_be_parsed_still_gets_its_id_recorded():
    env = environ()
    response = error_response(None, 400, "bad", environ=env)
    assert dict(response.headers)["X-Request-ID"] == of(env).request_id


def test_access_line_shows_the_recorded_facts():
    text = line(environ(**{KEY: answered()}), 200, 5, 20.0)
    assert text.startswith("203.0.113.7 - - [")
    assert text.endswith('20.0ms upstream=127.0.0.1:9001 upstream_ms=12.3 route=default rid=rid-1')


def test_access_line_of_an_unrecorded_request_shows_dashes():
    text = line(environ(), 404, None, 1.0)
    assert text.startswith("127.0.0.1 - - ")
    assert text.endswith("upstream=- upstream_ms=- route=- rid=-")


def test_access_line_quotes_the_error():
    record = RequestRecord(error='said "no"')
    assert line(environ(**{KEY: record}), 502, 0, 1.0).endswith(r' error="said \"no\""')


def test_json_line_has_numbers_for_times():
    entry = json.loads(json_line(environ(**{KEY: answered()}), "200", 5, 20.04))
    assert entry["upstream_ms"] == 12.3 and entry["total_ms"] == 20.0 and entry["status"] == 200
    assert entry["upstream"] == "127.0.0.1:9001" and entry["cache"] == "MISS" and "error" not in entry


def test_gunicorn_format_atoms_come_from_the_record():
    atoms = environ_atoms(environ(**{KEY: answered()}))
    assert atoms["rproxy.upstream"] == "127.0.0.1:9001" and atoms["rproxy.upstream_name"] == "app"
    assert atoms["rproxy.upstream_ms"] == "12.3" and atoms["rproxy.cache_ms"] == "0.50"
    assert atoms["rproxy.route"] == "default" and atoms["rproxy.request_id"] == "rid-1"
    assert "rproxy.error" not in atoms  # absent: gunicorn writes "-"


def test_a_tunnel_keeps_the_record_among_its_facts():
    env = environ(**{KEY: answered()})
    facts = {key: env.get(key) for key in FACTS}
    assert line(facts, 101, 0, 1.0) == line(env, 101, 0, 1.0)


def test_server_timing_splits_proxy_and_upstream_time():
    record = answered()
    timing = server_timing(record, time.perf_counter() - 0.05)
    proxy = float(re.search(r"proxy;dur=([\d.]+)", timing).group(1))
    assert proxy >= 50 - 12.4
    assert "upstream;dur=12.3" in timing and 'cache;desc="MISS";dur=0.50' in timing


def test_server_timing_without_upstream_or_cache():
    assert re.fullmatch(r"proxy;dur=[\d.]+", server_timing(RequestRecord(), time.perf_counter()))


def test_a_background_revalidation_records_its_facts_apart_from_the_request_answered_stale():
    import gevent

    from rproxy.httpcache.revalidation import revalidate_later
    from rproxy.httpcache.rules import Entry
    from rproxy.messages import Response
    from rproxy.middleware.cache import CacheConfig, HTTPCache

    cache = HTTPCache(CacheConfig(name="c"), {})
    request = Request.from_environ(environ())
    request.record.upstream, request.record.upstream_ms = "app", 3.0
    stale = Entry(200, "OK", [("Date", "Mon, 30 Nov 2026 10:00:00 GMT"), ("ETag", '"v1"')], b"x",
                  time.time() - 60, time.time() - 60, {}, ())
    background = []

    def upstream(req):
        req.record.upstream, req.record.upstream_ms, req.record.error = "app", 99.0, "late"
        background.append(req)
        return Response(304, [("ETag", '"v1"')], [])

    revalidate_later(cache, request, upstream, "key", stale)
    deadline = time.monotonic() + 5
    while "key" in cache.revalidating and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert background and background[0].record is not request.record
    assert background[0].environ[KEY] is background[0].record
    assert background[0].record.request_id == request.request_id
    assert (request.record.upstream_ms, request.record.error) == (3.0, None)
