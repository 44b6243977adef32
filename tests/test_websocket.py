"""WebSocket and other upgrades pass through rproxy as spliced byte streams."""

import asyncio
import base64
import json
import os
import signal
import socket
import ssl
import sys
import time

import pytest
import requests
import websocket
from conftest import REPO, Process, free_port, wait_for_port
from websockets.asyncio.client import connect as aconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect


@pytest.fixture(scope="module")
def ws_upstream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ws")
    port, raw_port = free_port(), free_port()
    proc = Process([sys.executable, str(REPO / "tests" / "ws_upstream.py"), "--port", str(port),
                    "--raw-port", str(raw_port)], tmp / "ws.log")
    wait_for_port(port, proc.proc)
    wait_for_port(raw_port, proc.proc)
    proc.port, proc.raw_port = port, raw_port
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def aio_upstream(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aio")
    port = free_port()
    proc = Process([sys.executable, str(REPO / "tests" / "ws_asyncio_upstream.py"), "--port", str(port)],
                   tmp / "aio.log")
    wait_for_port(port, proc.proc)
    proc.port = port
    yield proc
    proc.stop()


def routes(ws_upstream, aio_upstream, route_extra="", server_extra=None):
    return f"""
        [upstream:ws]
        servers = 127.0.0.1:{ws_upstream.port}
        [upstream:raw]
        servers = 127.0.0.1:{ws_upstream.raw_port}
        [upstream:aio]
        servers = 127.0.0.1:{aio_upstream.port}
        [route:default]
        upstream = ws
        {route_extra}
        [route:raw]
        path = /raw
        upstream = raw
        upgrade = websocket tcp-echo
        [route:aio]
        path = /aio
        upstream = aio
        strip_prefix = yes
        {route_extra}
        """


@pytest.fixture
def ws_proxy(start_proxy, ws_upstream, aio_upstream):
    return start_proxy(routes(ws_upstream, aio_upstream))


def ws_url(proxy, path="/echo"):
    return f"ws://127.0.0.1:{proxy.port}{path}"


def test_text_and_binary_messages_echo(ws_proxy):
    ws = websocket.create_connection(ws_url(ws_proxy), timeout=10)
    ws.send("hello")
    assert ws.recv() == "hello"
    ws.send_binary(bytes(range(256)))
    assert ws.recv() == bytes(range(256))
    ws.close()


def test_16mib_message_passes_whole(ws_proxy):
    payload = os.urandom(16 << 20)
    ws = websocket.create_connection(ws_url(ws_proxy), timeout=30)
    ws.send_binary(payload)
    assert ws.recv() == payload
    ws.close()


def test_ping_pong_and_subprotocol(ws_proxy):
    ws = websocket.create_connection(ws_url(ws_proxy), timeout=10, subprotocols=["chat.v1", "chat.v2"])
    assert ws.getsubprotocol() == "chat.v2"
    ws.ping(b"are you there")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_PONG and frame.data == b"are you there"
    ws.close()


def test_handshake_headers_pass_with_forwarding_headers(ws_proxy):
    ws = websocket.create_connection(ws_url(ws_proxy), timeout=10, header=["X-Request-ID: ws-rid-1"])
    key_accept = ws.getheaders()["sec-websocket-accept"]
    ws.send("!headers")
    seen = json.loads(ws.recv())
    ws.close()
    assert key_accept
    assert seen["HTTP_UPGRADE"].lower() == "websocket" and "upgrade" in seen["HTTP_CONNECTION"].lower()
    assert seen["HTTP_SEC_WEBSOCKET_KEY"] and seen["HTTP_SEC_WEBSOCKET_VERSION"] == "13"
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1" and seen["HTTP_X_REAL_IP"] == "127.0.0.1"
    assert seen["HTTP_X_FORWARDED_PROTO"] == "http"
    assert seen["HTTP_X_REQUEST_ID"] == "ws-rid-1"


def test_permessage_deflate_is_negotiated_end_to_end(ws_proxy):
    with sync_connect(ws_url(ws_proxy, "/aio/"), compression="deflate") as ws:
        assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
        text = "compressible " * 10000
        ws.send(text)
        assert ws.recv() == text


def test_close_codes_pass_both_ways(ws_proxy, aio_upstream):
    with sync_connect(ws_url(ws_proxy, "/aio/")) as ws:
        ws.send("close:4002")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
        assert info.value.rcvd.code == 4002
    with sync_connect(ws_url(ws_proxy, "/aio/")) as ws:
        ws.close(4005, "done here")
    time.sleep(0.3)
    with sync_connect(f"ws://127.0.0.1:{aio_upstream.port}/") as ws:
        ws.send("!closes")
        assert 4005 in json.loads(ws.recv())


@pytest.mark.parametrize("code", [403, 404, 426])
def test_upstream_refusing_the_upgrade_is_relayed(ws_proxy, code):
    r = requests.get(ws_proxy.url + f"/reject/{code}", timeout=10, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode()})
    assert r.status_code == code and r.json() == {"rejected": code}


def test_upstream_refused_or_silent_gives_502_or_504(start_proxy, ws_upstream):
    proxy = start_proxy(f"""
        [upstream:gone]
        servers = 127.0.0.1:{free_port()}
        [route:default]
        upstream = gone
        """)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url(proxy), timeout=10)
    assert info.value.status_code == 502


def test_upstream_timeout_before_101_gives_504(start_proxy, upstream):
    # The HTTP test upstream's /slow never switches, and answers too late.
    proxy = start_proxy(f"""
        [upstream:slow]
        servers = 127.0.0.1:{upstream.port}
        read_timeout = 300ms
        [route:default]
        upstream = slow
        """)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url(proxy, "/slow?delay=2"), timeout=10)
    assert info.value.status_code == 504


def handshake(path: str, upgrade="websocket") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key.decode()}\r\n\r\n").encode()


def masked_text(text: bytes) -> bytes:
    key = os.urandom(4)
    return bytes([0x81, 0x80 | len(text)]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(text))


def read_until(sock, marker: bytes, limit=1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_frame_in_the_same_packet_as_the_101_is_forwarded(ws_proxy):
    with socket.create_connection(("127.0.0.1", ws_proxy.port), timeout=10) as s:
        s.sendall(handshake("/raw/first-frame"))
        data = read_until(s, b"\x81\x05hello")
    assert data.startswith(b"HTTP/1.1 101 ")
    assert data.endswith(b"\r\n\r\n\x81\x05hello")


def test_frame_right_behind_the_request_is_forwarded(ws_proxy):
    with socket.create_connection(("127.0.0.1", ws_proxy.port), timeout=10) as s:
        s.sendall(handshake("/echo") + masked_text(b"early"))
        data = read_until(s, b"early")
    assert data.startswith(b"HTTP/1.1 101 ") and data.endswith(b"\x81\x05early")


def test_other_upgrade_tokens_tunnel_bytes_and_half_close(ws_proxy):
    with socket.create_connection(("127.0.0.1", ws_proxy.port), timeout=10) as s:
        s.sendall(handshake("/raw/tcp", upgrade="tcp-echo") + b"ping-1 ")
        head = read_until(s, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        s.sendall(b"ping-2")
        s.shutdown(socket.SHUT_WR)   # our EOF reaches the upstream, its answer still reaches us
        rest = head.split(b"\r\n\r\n", 1)[1]
        while chunk := s.recv(65536):
            rest += chunk
    assert rest == b"ping-1 ping-2bye"


def test_upgrade_tokens_the_route_does_not_allow_are_not_tunnelled(ws_proxy):
    # The default route allows websocket only: tcp-echo is forwarded as a plain request.
    with socket.create_connection(("127.0.0.1", ws_proxy.port), timeout=10) as s:
        s.sendall(handshake("/reject/400", upgrade="tcp-echo"))
        data = read_until(s, b"}")
    assert data.startswith(b"HTTP/1.1 400 ")


def test_idle_tunnel_is_closed(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream, route_extra="idle_timeout = 700ms"))
    ws = websocket.create_connection(ws_url(proxy), timeout=10)
    ws.send("x")
    assert ws.recv() == "x"
    started = time.monotonic()
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        ws.recv()
    assert 0.5 < time.monotonic() - started < 5
    assert "tunnel idle for 0.7s" in proxy.log()


def test_tunnel_limit_per_worker_answers_503(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream), server={"max_tunnels": "2"})
    open_ = [websocket.create_connection(ws_url(proxy), timeout=10) for _ in range(2)]
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url(proxy), timeout=10)
    assert info.value.status_code == 503
    open_.pop().close()
    time.sleep(0.3)
    websocket.create_connection(ws_url(proxy), timeout=10).close()
    for ws in open_:
        ws.close()


def test_graceful_shutdown_sends_going_away_to_both_peers(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream), server={"graceful_timeout": "10s"})
    with sync_connect(ws_url(proxy, "/aio/")) as ws:
        ws.send("before")
        assert ws.recv() == "before"
        os.kill(proxy.pid, signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        assert time.monotonic() - started < 5
    proxy.proc.wait(15)
    with sync_connect(f"ws://127.0.0.1:{aio_upstream.port}/") as ws:
        ws.send("!closes")
        assert 1001 in json.loads(ws.recv())


def test_access_log_line_per_tunnel_and_no_error_noise(ws_proxy):
    ws = websocket.create_connection(ws_url(ws_proxy), timeout=10, header=["X-Request-ID: tunnel-log"])
    ws.send("a" * 1000)
    assert ws.recv() == "a" * 1000
    ws.close()
    line, = ws_proxy.wait_for_log(r"rid=tunnel-log", timeout=5)
    assert '"GET /echo HTTP/1.1" 101 ' in line
    up = int(line.split("tunnel_up=")[1].split()[0])
    down = int(line.split("tunnel_down=")[1].split()[0])
    assert up > 1000 and down > 1000  # the message each way, framed
    assert "ms upstream=" in line
    log = ws_proxy.log()
    assert "[ERROR]" not in log and "Traceback" not in log


async def _many(url: str, count: int, concurrency: int, hold: bool):
    """Open `count` tunnels, `concurrency` handshakes at a time; each echoes a
    message of its own. With hold, all stay open until every one has echoed."""
    gate = asyncio.Semaphore(concurrency)
    all_open = asyncio.Event()
    opened = 0

    async def one(i):
        nonlocal opened
        async with gate:
            ws = await aconnect(url, compression=None, ping_interval=None, open_timeout=30)
        try:
            opened += 1
            if hold:
                if opened == count:
                    all_open.set()
                await asyncio.wait_for(all_open.wait(), 60)
            await ws.send(f"message {i}")
            assert await ws.recv() == f"message {i}"
        finally:
            await ws.close()
        return True
    results = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(results)


def test_1000_concurrent_tunnels_through_one_worker(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream),
                        server={"worker_connections": "3000", "max_tunnels": "2000"})
    assert asyncio.run(_many(ws_url(proxy), 1000, 200, hold=True)) == 1000


def test_10000_tunnels_leave_no_fds_or_memory_behind(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream))
    worker = proxy.workers()[0]
    asyncio.run(_many(ws_url(proxy), 500, 50, hold=False))  # warm up
    time.sleep(0.5)
    fds, rss = worker.num_fds(), worker.memory_info().rss
    assert asyncio.run(_many(ws_url(proxy), 10000, 50, hold=False)) == 10000
    time.sleep(1)
    assert worker.num_fds() <= fds + 2
    assert worker.memory_info().rss - rss < 8 << 20


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory):
    import trustme
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "cert.pem", "key": tmp / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["cert"]), append=True)
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return {k: str(v) for k, v in paths.items()}


def test_wss_with_tls_termination_and_a_tls_upstream(start_proxy, tmp_path, tls_certs):
    port, raw_port = free_port(), free_port()
    upstream = Process([sys.executable, str(REPO / "tests" / "ws_upstream.py"), "--port", str(port),
                        "--raw-port", str(raw_port), "--certfile", tls_certs["cert"],
                        "--keyfile", tls_certs["key"]], tmp_path / "wss-upstream.log")
    try:
        wait_for_port(port, upstream.proc)
        proxy = start_proxy(f"""
            [upstream:wss]
            servers = https://127.0.0.1:{port}
            ca_file = {tls_certs["ca"]}
            [route:default]
            upstream = wss
            """, server={"certfile": tls_certs["cert"], "keyfile": tls_certs["key"]})
        context = ssl.create_default_context(cafile=tls_certs["ca"])
        ws = websocket.create_connection(f"wss://127.0.0.1:{proxy.port}/echo", timeout=10,
                                         sslopt={"context": context})
        payload = os.urandom(1 << 20)
        ws.send_binary(payload)
        assert ws.recv() == payload
        ws.send("!headers")
        assert json.loads(ws.recv())["HTTP_X_FORWARDED_PROTO"] == "https"
        ws.close()
    finally:
        upstream.stop()


def frames(*payload_sizes, masked=True):
    out = b""
    for size in payload_sizes:
        if size < 126:
            head = bytes([0x82, (0x80 if masked else 0) | size])
        elif size < 65536:
            head = bytes([0x82, (0x80 if masked else 0) | 126]) + size.to_bytes(2, "big")
        else:
            head = bytes([0x82, (0x80 if masked else 0) | 127]) + size.to_bytes(8, "big")
        out += head + (b"mask" if masked else b"") + b"p" * size
    return out


@pytest.mark.parametrize("split", [1, 2, 3, 7, 100, 70000])
def test_frame_tracker_finds_boundaries_across_any_split(split):
    from rproxy.forwarding.tunnel import FrameTracker
    stream = frames(5, 200, 70000, 0, 125, masked=True) + frames(3, masked=False)
    boundaries = set()
    pos = 0
    for size, masked in ((5, 1), (200, 1), (70000, 1), (0, 1), (125, 1), (3, 0)):
        head = 2 + (2 if 126 <= size < 65536 else 8 if size >= 65536 else 0) + 4 * masked
        pos += head + size
        boundaries.add(pos)
    tracker = FrameTracker()
    for start in range(0, len(stream), split):
        tracker.feed(stream[start:start + split])
        end = min(start + split, len(stream))
        assert tracker.at_boundary == (end in boundaries), end


def test_reload_with_hup_sends_going_away_and_keeps_serving(start_proxy, ws_upstream, aio_upstream):
    proxy = start_proxy(routes(ws_upstream, aio_upstream))
    with sync_connect(ws_url(proxy, "/aio/")) as ws:
        os.kill(proxy.pid, signal.SIGHUP)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    ws = websocket.create_connection(ws_url(proxy), timeout=10)
    ws.send("after reload")
    assert ws.recv() == "after reload"
    ws.close()


def test_switching_head_keeps_upgrade_and_drops_hop_by_hop_and_malformed():
    from rproxy.forwarding.tunnel import switching_head
    head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n"
            b"X-Hop: 1\r\nKeep-Alive: 5\r\nSec-WebSocket-Accept: abc=\r\nX-Bad: a\x01b\r\n\r\n")
    out = switching_head(head)
    assert out == (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Accept: abc=\r\n\r\n")
