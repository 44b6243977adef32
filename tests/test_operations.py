"""What an operator runs the proxy with: /healthz and /readyz on the admin
listener, the Server header, and the live status feed over a WebSocket."""

import base64
import json
import os
import signal
import ssl
import time

import httpx
import pytest
import requests
import websocket
from conftest import free_port, raw_exchange, single_route


def admin_ini(body: str, admin_port: int) -> str:
    return body + f"\n[admin]\nbind = 127.0.0.1:{admin_port}\n"


def two_servers(a: int, b: int, upstream_extra: str = "") -> str:
    return (f"[upstream:app]\nservers = 127.0.0.1:{a} 127.0.0.1:{b}\n{upstream_extra}\n"
            "[route:default]\npath = /\nupstream = app\n")


def ready(admin: int) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)


def wait_for_readiness(admin: int, status: int, timeout: float = 15.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = ready(admin)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r
        time.sleep(0.1)


def test_healthz_and_readyz_when_all_is_well(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(single_route(upstream.port), admin), workers=2)
    health = requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10)
    assert health.status_code == 200 and health.text == "ok\n"
    assert requests.head(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200
    r = wait_for_readiness(admin, 200)
    body = r.json()
    assert r.headers["Content-Type"] == "application/json" and r.headers["Cache-Control"] == "no-store"
    assert body["ready"] is True and body["reasons"] == []
    assert body["workers"] == {"up": 2, "configured": 2}
    assert body["upstreams"] == {"app": {"servers": 1, "in_rotation": 1}}
    assert body["config"] == str(proxy.ini_path)
    # Never through a route, never anything but GET and HEAD.
    assert "\"workers\"" not in requests.get(proxy.url + "/readyz", timeout=10).text
    assert requests.post(f"http://127.0.0.1:{admin}/readyz", timeout=10).status_code == 405


def test_readyz_503_while_an_upstream_has_no_server_in_rotation_passive(start_proxy, start_upstream):
    admin = free_port()
    a, b = start_upstream(), start_upstream()
    proxy = start_proxy(admin_ini(two_servers(a.port, b.port, "max_fails = 1\nfail_timeout = 2s\n"), admin))
    wait_for_readiness(admin, 200)
    a.stop()
    b.stop()
    # Real requests find both servers dead and take them out (passive health).
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 502
    r = ready(admin)
    assert r.status_code == 503
    assert r.json()["reasons"] == ["upstream app: no server in rotation"]
    assert r.json()["upstreams"]["app"]["in_rotation"] == 0
    assert requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200
    start_upstream(a.port), start_upstream(b.port)
    # After fail_timeout the servers are back on trial: in rotation, and answering.
    wait_for_readiness(admin, 200)
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200


def test_readyz_503_while_an_upstream_fails_its_health_checks(start_proxy, start_upstream):
    admin = free_port()
    server = start_upstream()
    start_proxy(admin_ini(single_route(server.port, upstream_extra="health_check = GET /healthz\n"
                                                                   "health_interval = 300ms\n"), admin))
    wait_for_readiness(admin, 200)
    server.stop()
    r = wait_for_readiness(admin, 503)
    assert r.json()["reasons"] == ["upstream app: no server in rotation"]
    start_upstream(server.port)
    wait_for_readiness(admin, 200)


def test_readyz_503_while_fewer_workers_than_configured_run(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(single_route(upstream.port), admin), workers=2)
    wait_for_readiness(admin, 200)
    os.kill(proxy.pid, signal.SIGTTOU)  # the master runs one worker fewer
    r = wait_for_readiness(admin, 503)
    assert r.json()["reasons"] == ["workers: 1 of 2 up"]
    os.kill(proxy.pid, signal.SIGTTIN)
    wait_for_readiness(admin, 200)


def server_fields(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"server:")]


ROUTED_HOST = "[upstream:app]\nservers = 127.0.0.1:{port}\n[route:app]\nhost = app.test\nupstream = app\n"
ROUTED_DEAD = "[upstream:dead]\nservers = 127.0.0.1:{dead}\n[route:dead]\nhost = dead.test\nupstream = dead\n"


@pytest.mark.parametrize("setting, expected", [
    (None, [b"Server: rproxy"]),
    ("off", []),
    ("Apache", [b"Server: Apache"]),
])
def test_server_header_over_http1_on_proxied_and_own_answers(start_proxy, upstream, setting, expected):
    extra = {"server_header": setting} if setting else {}
    ini = ROUTED_HOST.format(port=upstream.port) + ROUTED_DEAD.format(dead=free_port())
    proxy = start_proxy(ini, server=extra)
    for host, path, status in [("app.test", "/echo", b"200"), ("nowhere.test", "/", b"404"),
                               ("dead.test", "/", b"502")]:
        head = raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                            .encode())
        assert head.split(b" ")[1] == status, head[:200]
        assert server_fields(head) == expected, (host, head[:400])
    # HEAD and 304-like answers without a body carry it too.
    head = raw_exchange(proxy.port, b"HEAD /echo HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
    assert server_fields(head) == expected


@pytest.mark.parametrize("setting, expected", [(None, "rproxy"), ("off", None), ("Apache", "Apache")])
def test_server_header_over_http2(start_proxy, upstream, certs, setting, expected):
    server = {"certfile": certs.cert, "keyfile": certs.key, "http2": "yes"}
    if setting:
        server["server_header"] = setting
    ini = ROUTED_HOST.format(port=upstream.port) + ROUTED_DEAD.format(dead=free_port())
    proxy = start_proxy(ini, server=server)
    with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=certs.ca_file), timeout=20) as c:
        for host, status in [("app.test", 200), ("nowhere.test", 404), ("dead.test", 502)]:
            r = c.get(f"https://127.0.0.1:{proxy.port}/echo", headers={"Host": host})
            assert r.http_version == "HTTP/2" and r.status_code == status
            assert r.headers.get_list("server") == ([expected] if expected else []), host
            assert r.headers.get("date")


def test_server_header_value_must_be_one_line(tmp_path):
    from rproxy import config
    path = tmp_path / "bad.ini"
    path.write_text("[server]\nserver_header = a\x00b\n" + single_route(1))
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert e.value.section == "server" and e.value.key == "server_header"


def feed(admin: int, **headers) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{admin}/status/live", timeout=10,
                                       suppress_origin=True, header=[f"{k}: {v}" for k, v in headers.items()])


def test_live_status_feed_pushes_every_second(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(single_route(upstream.port), admin))
    requests.get(proxy.url + "/echo", timeout=10)
    ws = feed(admin, Origin=f"http://127.0.0.1:{admin}")
    try:
        started = time.monotonic()
        first = json.loads(ws.recv())
        assert first["routes"][0]["name"] == "default" and "rproxy_requests_total" in first["samples"]
        for _ in range(5):
            requests.get(proxy.url + "/echo", timeout=10)
        seen = first
        while sum(s["value"] for s in seen["samples"]["rproxy_requests_total"]) < 6:
            seen = json.loads(ws.recv())
            assert time.monotonic() - started < 10
        later = json.loads(ws.recv())
        assert 0.5 <= later["time"] - seen["time"] <= 3  # pushed about once a second
        ws.ping(b"hi")  # answered, and the feed goes on
        assert json.loads(ws.recv())["pid"] == first["pid"]
    finally:
        ws.close()
    # The feed is gone from the worker: requests still served, a new one opens.
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200
    again = feed(admin)
    assert json.loads(again.recv())["routes"]
    again.close()


def test_live_status_feed_refuses_what_is_not_its_own_page(start_proxy, upstream):
    admin = free_port()
    start_proxy(admin_ini(single_route(upstream.port), admin))
    # Another site's page in the operator's browser may not read it.
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        feed(admin, Origin="http://evil.example")
    assert e.value.status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        feed(admin, Origin="null")
    assert e.value.status_code == 403
    # Not a WebSocket handshake: told what it takes.
    r = requests.get(f"http://127.0.0.1:{admin}/status/live", timeout=10)
    assert r.status_code == 426 and r.headers["Upgrade"] == "websocket"
    key = base64.b64encode(os.urandom(16)).decode()
    answer = raw_exchange(admin, (f"GET /status/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                  f"Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
                                  f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 426") and b"Sec-WebSocket-Version: 13" in answer
    answer = raw_exchange(admin, (b"GET /status/live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                  b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                                  b"Sec-WebSocket-Key: c2hvcnQ=\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 400")


def test_live_status_feed_drops_a_client_announcing_a_huge_frame(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(single_route(upstream.port), admin))
    ws = feed(admin)
    ws.recv()
    # A masked text frame header announcing 2**62 bytes: never read, the feed ends.
    ws.sock.sendall(b"\x81\xff" + (1 << 62).to_bytes(8, "big") + b"\x00\x00\x00\x00")
    deadline = time.monotonic() + 10
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        while time.monotonic() < deadline:
            ws.recv()
    assert requests.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).status_code == 200
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200


def test_live_status_feed_says_going_away_when_the_worker_stops(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(single_route(upstream.port), admin))
    ws = feed(admin)
    ws.recv()
    os.kill(proxy.pid, signal.SIGHUP)  # reload: the old worker stops gracefully
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            assert int.from_bytes(data[:2], "big") == 1001
            break
    else:
        pytest.fail("no close frame")
    ws.close()
