"""An upstream's 103 Early Hints reach the client before the final answer
(HTTP/1.1 and HTTP/2), never an HTTP/1.0 client; other interim answers
(102) do not; and a cached answer never replays a 103."""

from __future__ import annotations

import pytest
from conftest import raw_exchange, single_route
from h2client import RawH2
from scripted_upstream import ScriptedUpstream

HINTS = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
         b"Connection: X-Hop\r\nX-Hop: 1\r\n\r\n")
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\nok"
H2C = {"http2": "yes", "http2_cleartext": "yes"}


@pytest.fixture
def scripted():
    made: list[ScriptedUpstream] = []

    def make(answer: bytes) -> ScriptedUpstream:
        upstream = ScriptedUpstream(answer)
        made.append(upstream)
        return upstream
    yield make
    for upstream in made:
        upstream.stop()


def answers(reply: bytes) -> list[bytes]:
    """The heads of every answer in `reply`, in order (bodies here are "ok")."""
    heads = []
    while reply:
        head, _, reply = reply.partition(b"\r\n\r\n")
        heads.append(head)
        if not head.startswith(b"HTTP/1.1 1"):
            break
    return heads


def get(port: int, path: str, version: bytes = b"HTTP/1.1") -> list[bytes]:
    return answers(raw_exchange(port, b"GET " + path.encode() + b" " + version
                                + b"\r\nHost: x\r\nConnection: close\r\n\r\n"))


def test_early_hints_reach_an_http11_client_before_the_answer(start_proxy, scripted):
    upstream = scripted(HINTS + FINAL)
    proxy = start_proxy(single_route(upstream.port))
    hints, final = get(proxy.port, "/page")
    assert hints.startswith(b"HTTP/1.1 103 ")
    assert b"Link: </style.css>; rel=preload; as=style" in hints
    # Hop-by-hop headers of the upstream's 103 stay between it and us.
    assert b"X-Hop" not in hints and b"Connection" not in hints
    assert final.startswith(b"HTTP/1.1 200 ")


def test_an_http10_client_gets_only_the_final_answer(start_proxy, scripted):
    upstream = scripted(HINTS + FINAL)
    proxy = start_proxy(single_route(upstream.port))
    (final,) = get(proxy.port, "/page", b"HTTP/1.0")
    assert final.startswith(b"HTTP/1.0 200 ")


def test_102_processing_is_not_passed_on(start_proxy, scripted):
    upstream = scripted(b"HTTP/1.1 102 Processing\r\n\r\n" + FINAL)
    proxy = start_proxy(single_route(upstream.port))
    (final,) = get(proxy.port, "/slow")
    assert final.startswith(b"HTTP/1.1 200 ")


def test_early_hints_reach_an_http2_client(start_proxy, scripted):
    upstream = scripted(HINTS + FINAL)
    proxy = start_proxy(single_route(upstream.port), server=H2C)
    client = RawH2(proxy.port)
    try:
        answer = client.response(client.request("GET", "/page"))
    finally:
        client.close()
    assert answer["status"] == 200 and answer["body"] == b"ok"
    (interim,) = answer["interim"]
    fields = dict(interim)
    assert fields[":status"] == "103" and fields["link"] == "</style.css>; rel=preload; as=style"
    assert "x-hop" not in fields


def test_a_cached_answer_does_not_replay_the_early_hints(start_proxy, scripted):
    upstream = scripted(HINTS + FINAL)
    proxy = start_proxy(single_route(upstream.port) + "\n[cache]\n")
    first = get(proxy.port, "/cached")
    assert [h.split(b"\r\n")[0] for h in first] == [b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 200 OK"]
    (hit,) = get(proxy.port, "/cached")
    assert hit.startswith(b"HTTP/1.1 200 ") and b"X-Cache: HIT" in hit
    assert len(upstream.received) == 1
