"""[server] preserve_header_case: header names spelled as each side sent
them. End to end: a real gunicorn, an upstream that records the raw bytes it
receives and answers with mixed-case names, a raw-socket client. And the
spelling table itself, in-process."""

from __future__ import annotations

import subprocess

import pytest
from conftest import raw_exchange, single_route
from scripted_upstream import ScriptedUpstream
from test_http2 import client, curl, https, tls

from rproxy.forwarding.exchange import request_head
from rproxy.server import header_case

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-upstream-TOKEN: t\r\nETAG: \"e\"\r\n"
          b"content-type: text/plain\r\nConnection: close\r\n\r\nok")

REQUEST = (b"GET /case HTTP/1.1\r\nhost: example.test\r\nx-api-KEY: k1\r\nX-LEGACY-Thing: a\r\n"
           b"accept: */*\r\nx-forwarded-for: 10.9.8.7\r\nconnection: close\r\n\r\n")


@pytest.fixture
def mixed_case_upstream():
    upstream = ScriptedUpstream(ANSWER)
    yield upstream
    upstream.stop()


def names_received(upstream: ScriptedUpstream) -> list[bytes]:
    assert len(upstream.received) == 1, upstream.received
    head = upstream.received[0].split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:]]


def names_answered(reply: bytes) -> list[bytes]:
    head = reply.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200 "), reply
    return [line.split(b":", 1)[0] for line in head.split(b"\r\n")[1:]]


@pytest.mark.parametrize("parser", ["fast", "python"])
def test_request_names_reach_the_upstream_as_the_client_spelled_them(start_proxy, mixed_case_upstream, parser):
    proxy = start_proxy(single_route(mixed_case_upstream.port),
                        server={"preserve_header_case": "yes"}, args=["--http-parser", parser])
    reply = raw_exchange(proxy.port, REQUEST)
    assert reply.endswith(b"\r\n\r\nok"), reply
    sent = names_received(mixed_case_upstream)
    for name in (b"host", b"x-api-KEY", b"X-LEGACY-Thing", b"accept"):
        assert name in sent, sent
    # Replaced by the proxy (peer 127.0.0.1 is not trusted), still spelled as the client did.
    assert b"x-forwarded-for" in sent, sent
    # Added by the proxy: its own spelling.
    assert b"X-Request-Id" in sent and b"X-Real-Ip" in sent, sent
    assert b"connection" not in [n.lower() for n in sent]  # hop-by-hop, dropped as ever


def test_without_the_option_request_names_go_upstream_title_cased(start_proxy, mixed_case_upstream):
    proxy = start_proxy(single_route(mixed_case_upstream.port))
    reply = raw_exchange(proxy.port, REQUEST)
    assert reply.endswith(b"\r\n\r\nok"), reply
    sent = names_received(mixed_case_upstream)
    for name in (b"Host", b"X-Api-Key", b"X-Legacy-Thing", b"Accept", b"X-Forwarded-For"):
        assert name in sent, sent


@pytest.mark.parametrize("setting", ["yes", "no"])
def test_response_names_reach_the_client_as_the_upstream_spelled_them(start_proxy, mixed_case_upstream, setting):
    proxy = start_proxy(single_route(mixed_case_upstream.port), server={"preserve_header_case": setting})
    answered = names_answered(raw_exchange(proxy.port, REQUEST))
    for name in (b"x-upstream-TOKEN", b"ETAG", b"content-type", b"Content-Length"):
        assert name in answered, answered


def test_each_request_on_a_connection_keeps_its_own_spelling(start_proxy):
    recorder = ScriptedUpstream(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    try:
        proxy = start_proxy(single_route(recorder.port), server={"preserve_header_case": "yes"})
        reply = raw_exchange(proxy.port, b"GET /1 HTTP/1.1\r\nHost: x\r\nX-Token: 1\r\n\r\n"
                                         b"GET /2 HTTP/1.1\r\nHOST: x\r\nx-TOKEN: 2\r\nConnection: close\r\n\r\n")
        assert reply.count(b"HTTP/1.1 204 ") == 2, reply
        heads = sorted(recorder.received)  # GET /1 first
        assert b"\r\nHost: x\r\n" in heads[0] and b"\r\nX-Token: 1\r\n" in heads[0], heads
        assert b"\r\nHOST: x\r\n" in heads[1] and b"\r\nx-TOKEN: 2\r\n" in heads[1], heads
    finally:
        recorder.stop()


def test_over_http2_names_go_upstream_as_the_proxy_writes_them(start_proxy, mixed_case_upstream, certs):
    # HTTP/2 names are lower-case on the wire (RFC 9113 8.2.1): no case to keep.
    proxy = start_proxy(single_route(mixed_case_upstream.port), server=tls(certs, preserve_header_case="yes"))
    with client(certs) as c:
        r = c.get(https(proxy) + "/case", headers={"X-Api-KEY": "k"})
    assert r.http_version == "HTTP/2" and r.status_code == 200 and r.text == "ok"
    sent = names_received(mixed_case_upstream)
    assert b"X-Api-Key" in sent and b"Host" in sent, sent
    assert r.headers["x-upstream-token"] == "t"  # lower-case, as HTTP/2 wants


def test_an_h2c_upgrade_request_is_served_with_the_option_on(start_proxy, mixed_case_upstream):
    # The HTTP/1.1 request that asks for h2c becomes stream 1 of the
    # HTTP/2 connection, names as any HTTP/2 request's.
    proxy = start_proxy(single_route(mixed_case_upstream.port),
                        server={"http2": "yes", "http2_cleartext": "yes", "preserve_header_case": "yes"})
    out = subprocess.run([curl(), "--http2", "-sS", "-H", "x-api-KEY: k", "-w", " %{http_version} %{http_code}",
                          proxy.url + "/case"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "ok 2 200", (out.stdout, out.stderr)
    assert b"X-Api-Key" in names_received(mixed_case_upstream)


def test_an_upgrade_request_keeps_the_clients_spelling_too(start_proxy):
    recorder = ScriptedUpstream(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        proxy = start_proxy(single_route(recorder.port, route_extra="upgrade = websocket"),
                            server={"preserve_header_case": "yes"})
        reply = raw_exchange(proxy.port, b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n"
                                         b"upgrade: websocket\r\nsec-websocket-KEY: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                         b"sec-websocket-version: 13\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 403 "), reply
        sent = names_received(recorder)
        for name in (b"host", b"connection", b"upgrade", b"sec-websocket-KEY", b"sec-websocket-version"):
            assert name in sent, sent
    finally:
        recorder.stop()


# --- in-process: the spelling table and the head ---------------------------


def test_spellings_map_the_proxys_names_to_the_clients():
    assert header_case.spellings([b"x-api-KEY", b"HOST", b"Content-type", b"x-api-key"]) == {
        "X-Api-Key": "x-api-KEY", "Host": "HOST", "Content-Type": "Content-type"}


def test_a_python_parsed_head_gives_the_same_spellings_skipping_continuation_lines():
    head = b"host: a\r\nX-thing: b\r\n  folded: not a name\r\nACCEPT : c"
    assert header_case.head_parsed(head) == {"Host": "host", "X-Thing": "X-thing", "Accept": "ACCEPT"}


def test_the_request_head_uses_the_spellings_given_and_the_proxys_names_otherwise():
    head = request_head("GET", "/", {"Host": "h", "X-Api-Key": "k", "X-Request-Id": "r"},
                        spelled={"Host": "host", "X-Api-Key": "x-api-KEY"})
    assert head == b"GET / HTTP/1.1\r\nhost: h\r\nx-api-KEY: k\r\nX-Request-Id: r\r\n\r\n"
    assert request_head("GET", "/", {"Host": "h"}) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
