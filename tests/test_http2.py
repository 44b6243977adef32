"""HTTP/2 from clients (over TLS by ALPN, or h2c with prior knowledge): every
feature behaves as over HTTP/1.1, and the streams of one connection are
served side by side."""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from email.utils import parsedate_to_datetime

import h2.events
import httpx
import pytest
from conftest import BIN, free_port, single_route
from h2client import RawH2
from test_streaming import PeakRSS, expected_sha
from upstream import pattern_bytes

MIB = 1 << 20


def tls(certs, **extra):
    return {"certfile": certs.cert, "keyfile": certs.key, "http2": "yes", **extra}


def https(proxy) -> str:
    return f"https://127.0.0.1:{proxy.port}"


def trusting(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def client(certs, **kwargs) -> httpx.Client:
    return httpx.Client(http2=True, verify=trusting(certs.ca_file), timeout=20, **kwargs)


def alpn(port: int, ca_file: str, offered: list[str]) -> str | None:
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(offered)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="127.0.0.1") as s:
        return s.selected_alpn_protocol()


def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed: python3 scripts/dev.py test installs it")
    return path


@pytest.fixture
def h2_proxy(start_proxy, upstream, certs):
    return start_proxy(single_route(upstream.port), server=tls(certs))


def test_alpn_offers_h2_then_http11_and_requests_reach_the_upstream_as_http11(h2_proxy, certs, upstream):
    assert alpn(h2_proxy.port, certs.ca_file, ["h2", "http/1.1"]) == "h2"
    assert alpn(h2_proxy.port, certs.ca_file, ["http/1.1"]) == "http/1.1"
    with client(certs) as c:
        r = c.get(https(h2_proxy) + "/echo/x?y=1", headers={"X-Request-ID": "h2-echo-1"})
    assert r.http_version == "HTTP/2" and r.status_code == 200
    echo = r.json()
    assert echo["request_line"] == "GET /echo/x?y=1 HTTP/1.1"
    headers = dict(echo["headers"])
    assert headers["Host"] == f"127.0.0.1:{h2_proxy.port}"  # from :authority
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["X-Real-Ip"] == "127.0.0.1"
    assert headers["X-Request-Id"] == "h2-echo-1"
    assert "Version" not in headers  # gunicorn's HTTP_VERSION marker is not a client header
    assert r.headers["x-request-id"] == "h2-echo-1"
    h2_proxy.wait_for_log(r'"GET /echo/x\?y=1 HTTP/2.0" 200')  # written once the stream has ended


def test_http2_stays_off_unless_asked(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server={"certfile": certs.cert, "keyfile": certs.key})
    assert alpn(proxy.port, certs.ca_file, ["h2", "http/1.1"]) == "http/1.1"
    with client(certs) as c:
        assert c.get(https(proxy) + "/echo").http_version == "HTTP/1.1"


def test_curl_http2_over_tls(h2_proxy, certs):
    out = subprocess.run([curl(), "--http2", "--cacert", certs.ca_file, "-sS", "-o", "/dev/null",
                          "-w", "%{http_version} %{http_code}", https(h2_proxy) + "/echo"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "2 200", out.stderr


def _ends(conn: RawH2, stream_ids: set[int], started: float) -> dict[int, tuple[int, bytes, float]]:
    """Read `conn` until each of `stream_ids` ended: its status, its body,
    and when it ended (seconds since `started`). The socket's own timeout
    bounds each read."""
    status: dict[int, int] = {}
    body: dict[int, bytes] = dict.fromkeys(stream_ids, b"")
    ends: dict[int, tuple[int, bytes, float]] = {}
    while len(ends) < len(stream_ids):
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        for event in conn.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status[event.stream_id] = int(dict(event.headers)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in body:
                    body[event.stream_id] += event.data
            elif isinstance(event, h2.events.StreamReset):
                raise AssertionError(f"stream {event.stream_id} reset: {event.error_code}")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in stream_ids:
                sid = event.stream_id
                ends[sid] = (status.get(sid, 0), body[sid], time.monotonic() - started)
        conn.flush()
    return ends


def test_a_slow_stream_does_not_hold_back_the_others_on_one_connection(h2_proxy, certs):
    # A bare client: httpx reads a connection under one lock, and a stream
    # queued behind the read of a slow one gets its response, received
    # already, only when that read returns (seen: all 50 fast responses in
    # its h2 state 0.4 s after the start, handed out at 4 s). 31 streams:
    # the proxy's default limit is 32.
    conn = RawH2(h2_proxy.port, certs.ca_file)
    conn.sock.settimeout(10)
    try:
        started = time.monotonic()
        slow = conn.request("GET", "/slow?delay=4")
        time.sleep(0.3)  # the slow one is in flight upstream first
        fast = [conn.request("GET", f"/echo/{i}") for i in range(30)]
        ends = _ends(conn, set(fast), started)
        [(slow_status, slow_body, _)] = _ends(conn, {slow}, started).values()
    finally:
        conn.close()
    assert [(ends[s][0], json.loads(ends[s][1])["request_line"]) for s in fast] == [
        (200, f"GET /echo/{i} HTTP/1.1") for i in range(30)]
    fast_done = max(end for _, _, end in ends.values())
    assert fast_done < 3.0, f"the fast requests waited for the slow one: {fast_done:.1f}s"
    assert slow_status == 200 and json.loads(slow_body) == {"slept": 4.0}


def test_every_response_arrives_without_waiting_for_a_later_write_on_its_connection(h2_proxy, certs):
    # Rounds of streams on one connection that finish in different turns of
    # the worker's loop (different upstream delays, bodies of one frame and
    # of many). Between rounds the client sends nothing and no stream is
    # left running, so a frame the proxy kept back would wait for nothing
    # and the round would time out.
    conn = RawH2(h2_proxy.port, certs.ca_file)
    conn.sock.settimeout(5)
    try:
        for round_ in range(8):
            started = time.monotonic()
            paths = [f"/echo/{round_}-{i}" for i in range(6)]
            paths += [f"/slow?delay={0.02 * i:.2f}" for i in range(1, 6)]
            paths += [f"/bytes?n={n}" for n in (1, 20_000, 70_000 + round_)]
            streams = {conn.request("GET", path): path for path in paths}
            ends = _ends(conn, set(streams), started)
            assert {streams[s]: status for s, (status, _, _) in ends.items()} == dict.fromkeys(paths, 200)
            assert len(ends[next(s for s, p in streams.items() if p == "/bytes?n=20000")][1]) == 20_000
            # Far below the 5 s a stranded frame would take to show as a timeout.
            assert max(end for _, _, end in ends.values()) < 3.0, ends
    finally:
        conn.close()


def test_a_body_whose_end_of_stream_flag_comes_after_the_response_is_not_reset(h2_proxy, certs):
    # httpx sends END_STREAM in a frame of its own after the body; a proxy
    # quick to answer (the body being complete by its Content-Length) must
    # not reset the stream before that frame comes, or httpx fails the request.
    conn = RawH2(h2_proxy.port, certs.ca_file)
    conn.sock.settimeout(10)
    try:
        upload = conn.request("POST", "/echo/late-end", headers=[("content-length", "1000")],
                              body=b"x" * 1000, end=False)
        [(status, body, _)] = _ends(conn, {upload}, time.monotonic()).values()
        assert status == 200 and json.loads(body)["body_sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
        conn.send(upload, b"", end=True)  # h2 refuses this on a stream reset meanwhile
        after = conn.request("GET", "/echo/after")
        # Frames go out in order: a reset of the upload would come before this answer (_ends fails on it).
        [(status, _, _)] = _ends(conn, {after}, time.monotonic()).values()
        assert status == 200
    finally:
        conn.close()


async def _many(url, ca_file, count):
    async with httpx.AsyncClient(http2=True, verify=trusting(ca_file), timeout=60,
                                 limits=httpx.Limits(max_connections=1)) as c:
        async def one(i):
            if i % 5 == 0:
                r = await c.get(url + f"/bytes?n={100_000 + i}")
                return i, r.status_code, hashlib.sha256(r.content).hexdigest()
            r = await c.post(url + f"/echo/{i}", content=b"%d" % i * 1000)
            return i, r.status_code, r.json()
        return await asyncio.gather(*(one(i) for i in range(count)))


def test_many_concurrent_streams_on_one_connection_keep_their_own_bodies(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls(certs, http2_max_concurrent_streams="64"))
    for i, status, result in asyncio.run(_many(https(proxy), certs.ca_file, 300)):
        assert status == 200
        if i % 5 == 0:
            assert result == expected_sha(100_000 + i)
        else:
            assert result["request_line"] == f"POST /echo/{i} HTTP/1.1"
            assert result["body_sha256"] == hashlib.sha256(b"%d" % i * 1000).hexdigest()


def test_event_stream_arrives_event_by_event(h2_proxy, certs, upstream):
    key = f"h2-sse-{time.monotonic_ns()}"
    with client(certs) as c, c.stream("GET", https(h2_proxy) + f"/sse?key={key}") as r:
        assert r.http_version == "HTTP/2" and r.headers["content-type"] == "text/event-stream"
        lines = r.iter_lines()
        assert next(lines) == "data: first"
        httpx.get(upstream.url + f"/release?key={key}", timeout=5)
        assert [line for line in lines if line] == ["data: second"]


def test_large_download_and_uploads_stream(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls(certs, max_body_size="0"))
    size = 24 * MIB
    with client(certs) as c:
        c.get(https(proxy) + "/bytes?n=1048576")  # warm up
        worker = proxy.workers()[0]
        with PeakRSS(worker) as rss:
            digest, total = hashlib.sha256(), 0
            with c.stream("GET", https(proxy) + f"/bytes?n={size}") as r:
                assert r.headers["content-length"] == str(size)
                for piece in r.iter_raw():
                    digest.update(piece)
                    total += len(piece)
            assert total == size and digest.hexdigest() == expected_sha(size)
            # Without a length (HTTP/2 has no chunked coding): chunked upstream.
            r = c.post(https(proxy) + "/upload", content=pattern_bytes(size))
            echo = r.json()
            assert echo["body_length"] == size and echo["body_sha256"] == expected_sha(size)
            assert ["Transfer-Encoding", "chunked"] in echo["headers"]
            # With one: passed on as it is.
            r = c.post(https(proxy) + "/upload", content=pattern_bytes(size),
                       headers={"Content-Length": str(size)})
            echo = r.json()
            assert echo["body_length"] == size and echo["body_sha256"] == expected_sha(size)
            assert ["Content-Length", str(size)] in echo["headers"]
        # Streamed: the worker holds flow-control windows, never a body.
        assert rss.growth < size / 2, rss.growth


def test_upstream_cut_mid_body_resets_that_stream_only(h2_proxy, certs):
    with client(certs, limits=httpx.Limits(max_connections=1)) as c:
        for path in ("/abort?n=100000", "/abort-chunked?n=100000"):
            with pytest.raises(httpx.RemoteProtocolError):
                with c.stream("GET", https(h2_proxy) + path) as r:
                    assert r.status_code == 200
                    r.read()
        # The connection lives on: the next stream on it is served.
        after = c.get(https(h2_proxy) + "/echo")
        assert after.status_code == 200
    assert h2_proxy.log().count("cut the response mid-body") == 2
    # conftest asserts the log holds no traceback.


def test_upstream_cut_is_a_stream_reset_on_the_wire(h2_proxy, certs):
    conn = RawH2(h2_proxy.port, certs.ca_file)
    try:
        cut = conn.response(conn.request("GET", "/abort?n=100000"))
        assert cut["status"] == 200 and cut["reset"] == 0x2  # INTERNAL_ERROR
        assert 0 < len(cut["body"]) < 200000 and not cut["ended"]
        fine = conn.response(conn.request("GET", "/echo"))
        assert fine["status"] == 200 and fine["ended"]
    finally:
        conn.close()


def test_errors_are_the_same_over_http2(start_proxy, upstream, certs):
    dead = free_port()
    proxy = start_proxy(single_route(upstream.port, upstream_extra="read_timeout = 500ms")
                        + f"\n[upstream:dead]\nservers = 127.0.0.1:{dead}\n"
                          "[route:dead]\npath = /dead\nupstream = dead\n"
                          "[route:hosted]\nhost = only.example\npath = /\nupstream = app\n",
                        server=tls(certs, max_body_size="1k"))
    with client(certs) as c:
        r = c.get(https(proxy) + "/dead")
        assert r.status_code == 502 and "refused" in r.text and r.http_version == "HTTP/2"
        r = c.get(https(proxy) + "/slow?delay=3", headers={"Accept": "application/json"})
        assert r.status_code == 504 and r.json()["error"].startswith("upstream sent no response")
        r = c.post(https(proxy) + "/upload", content=b"x" * 4096)
        assert r.status_code == 413
        r = c.get(https(proxy) + "/%00")
        assert r.status_code == 400
        # The connection survived all of it.
        assert c.get(https(proxy) + "/echo").status_code == 200


def test_middleware_works_over_http2(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port)
                        + "\n[filter]\ndeny = /admin\n"
                          "[rate_limit:tight]\nlimit = 2/hour\n"
                          "[route:limited]\npath = /echo/limited\nupstream = app\nrate_limit = tight\n"
                          "[cache]\n[security_headers]\n",
                        server=tls(certs))
    with client(certs) as c:
        assert c.get(https(proxy) + "/admin/x").status_code == 404
        codes = [c.get(https(proxy) + "/echo/limited").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        url = https(proxy) + f"/cacheable?cc=max-age%3D600&date=100&t={time.monotonic_ns()}"
        first, second = c.get(url), c.get(url)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert first.json()["n"] == second.json()["n"] == 1
        # The origin's Date, stored and replayed, alone.
        assert second.headers.get_list("date") == first.headers.get_list("date")
        assert time.time() - parsedate_to_datetime(second.headers["date"]).timestamp() > 95
        assert c.get(https(proxy) + "/admin/x").headers.get_list("date")  # the proxy's own answer has one
        assert second.headers["strict-transport-security"].startswith("max-age=")
        assert second.headers["x-content-type-options"] == "nosniff"


def test_cookie_fields_are_joined_with_semicolons_for_the_upstream(h2_proxy, certs):
    conn = RawH2(h2_proxy.port, certs.ca_file)
    try:
        # RFC 9113 8.2.3: a client may split Cookie into one field per crumb.
        answer = conn.response(conn.request("GET", "/echo", headers=[
            ("cookie", "a=1"), ("cookie", "b=2, not-a-separator"), ("cookie", "c=3")]))
    finally:
        conn.close()
    import json
    headers = json.loads(answer["body"])["headers"]
    assert [v for k, v in headers if k == "Cookie"] == ["a=1; b=2, not-a-separator; c=3"]


def test_extended_connect_gets_a_clear_error_not_a_tunnel(h2_proxy, certs):
    conn = RawH2(h2_proxy.port, certs.ca_file)
    try:
        answer = conn.response(conn.request("CONNECT", "/chat", pseudo=[(":protocol", "websocket")],
                                            headers=[("sec-websocket-version", "13")]))
        assert answer["status"] == 400
        assert b"need HTTP/1.1" in answer["body"]
        # A plain CONNECT is refused as over HTTP/1.1.
        stream = conn.conn.get_next_available_stream_id()
        conn.conn.send_headers(stream, [(":method", "CONNECT"), (":authority", "example.com:443")],
                               end_stream=True)
        conn.flush()
        conn.streams[stream] = {"status": None, "headers": [], "body": b"", "reset": None, "ended": False}
        assert conn.response(stream)["status"] == 405
    finally:
        conn.close()


def test_client_resetting_an_upload_aborts_it_and_the_connection_goes_on(h2_proxy, certs):
    conn = RawH2(h2_proxy.port, certs.ca_file)
    try:
        stream = conn.request("POST", "/upload", headers=[("content-length", "1000000")], end=False)
        conn.send(stream, b"x" * 10000)
        time.sleep(0.3)
        conn.reset(stream)
        deadline = time.monotonic() + 10
        while "went away mid-upload" not in h2_proxy.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "went away mid-upload" in h2_proxy.log()
        fine = conn.response(conn.request("GET", "/echo"))
        assert fine["status"] == 200
    finally:
        conn.close()


def test_h2c_with_prior_knowledge_beside_http11(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port), server={"http2": "yes", "http2_cleartext": "yes"})
    with httpx.Client(http1=False, http2=True, timeout=10) as c:
        r = c.get(proxy.url + "/echo")
    assert r.http_version == "HTTP/2" and r.status_code == 200
    assert dict(r.json()["headers"])["X-Forwarded-Proto"] == "http"
    out = subprocess.run([curl(), "--http2-prior-knowledge", "-sS", "-o", "/dev/null",
                          "-w", "%{http_version} %{http_code}", proxy.url + "/echo"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == "2 200", out.stderr
    # HTTP/1.1 clients are still served on the same port.
    assert httpx.get(proxy.url + "/echo", timeout=10).http_version == "HTTP/1.1"


def test_without_http2_cleartext_the_preface_is_not_http2(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port))
    out = subprocess.run([curl(), "--http2-prior-knowledge", "-sS", "-o", "/dev/null",
                          "-w", "%{http_version}", proxy.url + "/echo"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout != "2"


@pytest.mark.parametrize("server, problem", [
    ("http2_cleartext = yes\n", "[server] http2_cleartext: needs http2 = yes"),
    ("http2 = yes\nhttp2_cleartext = yes\ncertfile = {cert}\nkeyfile = {key}\n",
     "[server] http2_cleartext: does not apply with certfile"),
    ("http2_max_concurrent_streams = 0\n", "[server] http2_max_concurrent_streams: '0' must be at least 1"),
])
def test_http2_config_errors(tmp_path, certs, server, problem):
    ini = tmp_path / "h2.ini"
    ini.write_text("[server]\n" + server.format(cert=certs.cert, key=certs.key) + single_route(1))
    out = subprocess.run([str(BIN / "rproxy"), "check", str(ini)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and problem in out.stderr, out.stderr


def test_a_client_that_pauses_reading_is_not_cut_by_the_idle_timeout(start_proxy, upstream, certs):
    # keepalive (the idle read timeout) is 1s; the client stops reading for
    # 3s while the proxy's writes are blocked on its full buffers.
    proxy = start_proxy(single_route(upstream.port), server=tls(certs, keepalive="1s"))
    size = 32 * MIB
    digest, total = hashlib.sha256(), 0
    with client(certs) as c, c.stream("GET", https(proxy) + f"/bytes?n={size}") as r:
        pieces = r.iter_raw()
        first = next(pieces)
        digest.update(first)
        total += len(first)
        time.sleep(3)
        for piece in pieces:
            digest.update(piece)
            total += len(piece)
    assert total == size and digest.hexdigest() == expected_sha(size)


async def _through_reload(url, ca_file, pid):
    async with httpx.AsyncClient(http2=True, verify=trusting(ca_file), timeout=30) as c:
        assert (await c.get(url + "/echo")).http_version == "HTTP/2"
        in_flight = asyncio.ensure_future(c.get(url + "/slow?delay=2"))
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGHUP)
        answer = await in_flight
        # Later requests reach the new worker, on a new connection if need be.
        after = [await c.get(url + "/echo") for _ in range(3)]
        return answer, after


def test_reload_finishes_the_streams_in_flight(h2_proxy, certs):
    answer, after = asyncio.run(_through_reload(https(h2_proxy), certs.ca_file, h2_proxy.pid))
    assert answer.status_code == 200 and answer.json() == {"slept": 2.0}
    assert [r.status_code for r in after] == [200, 200, 200]


def _frames_of(conn: RawH2, stream_id: int) -> list:
    """The h2 events of one stream until it ends or is reset."""
    seen = []
    while not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in seen):
        data = conn.sock.recv(65536)
        assert data, "the server closed the connection"
        for event in conn.conn.receive_data(data):
            if getattr(event, "stream_id", None) == stream_id:
                seen.append(event)
            if isinstance(event, h2.events.DataReceived):
                conn.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        conn.flush()
    return seen


def test_a_response_ends_with_its_last_data_frame_and_bodiless_ones_with_their_headers(start_proxy, upstream):
    # No empty DATA frame just to say "end": the frame that completes the
    # Content-Length carries END_STREAM; heads without a body still end.
    proxy = start_proxy(single_route(upstream.port), server={"http2": "yes", "http2_cleartext": "yes"})
    conn = RawH2(proxy.port)
    try:
        small = _frames_of(conn, conn.request("GET", "/bytes?n=100"))
        assert [type(e) for e in small] == [h2.events.ResponseReceived, h2.events.DataReceived,
                                            h2.events.StreamEnded]
        assert small[1].data == b"".join(pattern_bytes(100)) and small[1].stream_ended is not None

        big = _frames_of(conn, conn.request("GET", f"/bytes?n={200000}"))
        body = [e for e in big if isinstance(e, h2.events.DataReceived)]
        assert b"".join(e.data for e in body) == b"".join(pattern_bytes(200000))
        assert all(e.data for e in body) and body[-1].stream_ended is not None

        chunked = _frames_of(conn, conn.request("GET", "/bytes?n=1000&chunked=1"))
        data = b"".join(e.data for e in chunked if isinstance(e, h2.events.DataReceived))
        assert data == b"".join(pattern_bytes(1000))

        for method, path, status in (("HEAD", "/head", 200), ("GET", "/status/304", 304),
                                     ("GET", "/status/204", 204)):
            state = conn.response(conn.request(method, path))
            assert (state["status"], state["body"], state["ended"]) == (status, b"", True), (method, path)
    finally:
        conn.close()
