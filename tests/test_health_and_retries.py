"""Failing servers leave the rotation and come back; requests that can be
sent twice get another server, the others never."""

import signal
import socket
import threading
import time

import pytest
import requests
from conftest import free_port
from test_observability import metric, scrape


class BadServer:
    """A TCP server that reads each request head, then hangs up (mode
    'hangup') or holds the connection without a word (mode 'silent')."""

    def __init__(self, mode: str):
        self.mode = mode
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            if data:
                self.requests += 1
            if self.mode == "hangup":
                conn.close()
            else:
                self.held.append(conn)

    def close(self):
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def bad_server():
    made = []

    def make(mode):
        server = BadServer(mode)
        made.append(server)
        return server
    yield make
    for server in made:
        server.close()


def upstream_ini(*ports, extra=""):
    servers = " ".join(f"127.0.0.1:{p}" for p in ports)
    return f"[upstream:app]\nservers = {servers}\n{extra}\n[route:default]\nupstream = app\n"


def port_of(proxy, **kw):
    r = requests.get(proxy.url + "/echo", timeout=10, **kw)
    assert r.status_code == 200, r.text
    return r.json()["port"]


def test_dead_server_leaves_the_rotation_and_returns(start_proxy, start_upstream):
    a, b = start_upstream(), start_upstream()
    proxy = start_proxy(upstream_ini(a.port, b.port, extra="fail_timeout = 1s"))
    assert {port_of(proxy) for _ in range(4)} == {str(a.port), str(b.port)}
    port_a = a.port
    a.stop()
    # Every request still succeeds: the first one is retried on b, and a is out.
    assert {port_of(proxy) for _ in range(10)} == {str(b.port)}
    log = proxy.log()
    assert f"server 127.0.0.1:{port_a} out of rotation for 1s" in log
    assert log.count("trying another server") == 1
    start_upstream(port_a)
    time.sleep(1.2)
    assert str(port_a) in {port_of(proxy) for _ in range(6)}
    assert f"server 127.0.0.1:{port_a} is answering again" in proxy.log()


def test_active_health_check_takes_a_sick_server_out_and_back(start_proxy, start_upstream):
    a, b = start_upstream(), start_upstream()
    proxy = start_proxy(upstream_ini(a.port, b.port, extra="health_check = GET /healthz\n"
                                                           "health_interval = 200ms"))
    assert {port_of(proxy) for _ in range(4)} == {str(a.port), str(b.port)}
    requests.get(a.url + "/_sick?on=1", timeout=5)
    time.sleep(0.7)
    assert {port_of(proxy) for _ in range(8)} == {str(b.port)}
    assert f"server 127.0.0.1:{a.port} fails its health check (status 503)" in proxy.log()
    requests.get(a.url + "/_sick?on=0", timeout=5)
    time.sleep(0.7)
    assert {port_of(proxy) for _ in range(8)} == {str(a.port), str(b.port)}
    assert "passes its health check again" in proxy.log()


def test_every_server_down_gives_503_at_once(start_proxy):
    proxy = start_proxy(upstream_ini(free_port(), free_port(), extra="health_check = /healthz\n"
                                                                     "health_interval = 200ms\n"
                                                                     "connect_timeout = 5s"))
    time.sleep(0.7)
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 503 and "no server of upstream app is available" in r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 0.5


def test_after_passive_failures_of_all_servers_503_comes_at_once(start_proxy):
    proxy = start_proxy(upstream_ini(free_port(), free_port(), extra="fail_timeout = 30s"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 502  # both tried, both refused
    started = time.monotonic()
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 503 and 1 <= int(r.headers["Retry-After"]) <= 30
    assert time.monotonic() - started < 0.5


def test_get_without_response_head_is_retried_on_another_server(start_proxy, start_upstream, bad_server):
    hangup, good = bad_server("hangup"), start_upstream()
    proxy = start_proxy(upstream_ini(hangup.port, good.port))
    r = requests.get(proxy.url + "/echo", timeout=10)   # round robin starts with the first
    assert r.status_code == 200 and r.json()["port"] == str(good.port)
    assert hangup.requests == 1


def test_post_whose_body_was_sent_is_never_replayed(start_proxy, start_upstream, bad_server):
    hangup, good = bad_server("hangup"), start_upstream()
    proxy = start_proxy(upstream_ini(hangup.port, good.port))
    good.reset()
    r = requests.post(proxy.url + "/echo", data=b"pay once", timeout=10)
    assert r.status_code == 502
    assert hangup.requests == 1
    assert good.stats()["requests"] == 1  # the stats call only: the POST never reached it


def test_post_that_could_not_connect_goes_to_another_server(start_proxy, start_upstream):
    good = start_upstream()
    proxy = start_proxy(upstream_ini(free_port(), good.port))
    r = requests.post(proxy.url + "/echo", data=b"x" * 200_000, timeout=10)
    assert r.status_code == 200
    assert r.json()["port"] == str(good.port) and r.json()["body_length"] == 200_000


def test_read_timeout_retry_is_bounded_by_retry_timeout(start_proxy, start_upstream, bad_server):
    silent, good = bad_server("silent"), start_upstream()
    proxy = start_proxy(upstream_ini(silent.port, good.port, extra="read_timeout = 400ms\nretry_timeout = 5s"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200 and r.json()["port"] == str(good.port)

    silent2, good2 = bad_server("silent"), start_upstream()
    proxy2 = start_proxy(upstream_ini(silent2.port, good2.port, extra="read_timeout = 400ms\nretry_timeout = 300ms"))
    r = requests.get(proxy2.url + "/echo", timeout=10)
    assert r.status_code == 504


def test_retries_zero_means_one_attempt(start_proxy, start_upstream):
    good = start_upstream()
    proxy = start_proxy(upstream_ini(free_port(), good.port, extra="retries = 0"))
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 502
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200


def server_up(admin: int, port: int) -> float:
    return metric(scrape(admin), "rproxy_upstream_server_up", upstream="app", server=f"127.0.0.1:{port}")


def test_whole_group_killed_gives_503_without_connecting_until_one_is_back(start_proxy, start_upstream,
                                                                          hardening_record):
    group = [start_upstream() for _ in range(3)]
    ports = [u.port for u in group]
    admin = free_port()
    proxy = start_proxy(upstream_ini(*ports, extra="fail_timeout = 2s\nretries = 2")
                        + f"\n[admin]\nbind = 127.0.0.1:{admin}\n")
    assert {port_of(proxy) for _ in range(6)} == {str(p) for p in ports}
    for server in group:
        server.stop(signal.SIGKILL)
    # One request tries all three and counts their failures...
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 502
    assert len(proxy.log_lines("out of rotation for 2s after 1 failure")) == 3
    # ...then every request is answered at once, without a connection attempt.
    slowest = 0.0
    for _ in range(5):
        started = time.monotonic()
        r = requests.get(proxy.url + "/echo", timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        assert r.status_code == 503 and "no server of upstream app is available" in r.text
        assert 1 <= int(r.headers["Retry-After"]) <= 2
    assert slowest < 1
    assert len(proxy.log_lines("Connection refused")) == 3 + 2  # the three failures, two "trying another"
    assert len(proxy.log_lines("upstream app: no server is available")) == 1
    assert [server_up(admin, p) for p in ports] == [0, 0, 0]

    start_upstream(ports[1])
    time.sleep(int(r.headers["Retry-After"]) + 0.2)
    # Back from fail_timeout, each server gets one try: the live one answers.
    assert port_of(proxy) == str(ports[1])
    assert {port_of(proxy) for _ in range(6)} == {str(ports[1])}
    proxy.wait_for_log(f"server 127.0.0.1:{ports[1]} is answering again")
    assert [server_up(admin, p) for p in ports] == [0, 1, 0]
    hardening_record(("every server of a 3-server upstream killed (SIGKILL), fail_timeout 2s", "1 + 5 requests",
                      f"1 x 502 (all three tried, all out), then 5 x 503 with Retry-After, slowest "
                      f"{slowest * 1000:.0f} ms, no connection attempt, logged once; one restarted: served "
                      f"again after Retry-After"))


def test_health_check_brings_a_server_back_before_its_fail_timeout(start_proxy, start_upstream):
    group = [start_upstream() for _ in range(2)]
    ports = [u.port for u in group]
    proxy = start_proxy(upstream_ini(*ports, extra="fail_timeout = 60s\nhealth_check = GET /healthz\n"
                                                   "health_interval = 200ms"))
    assert {port_of(proxy) for _ in range(4)} == {str(p) for p in ports}
    for server in group:
        server.stop(signal.SIGKILL)
    codes = [requests.get(proxy.url + "/echo", timeout=10).status_code for _ in range(3)]
    assert codes[-1] == 503
    start_upstream(ports[0])
    proxy.wait_for_log(f"server 127.0.0.1:{ports[0]} passes its health check again")
    assert {port_of(proxy) for _ in range(4)} == {str(ports[0])}
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200


def test_a_lone_server_is_never_taken_out(start_proxy, start_upstream):
    server = start_upstream()
    port = server.port
    proxy = start_proxy(upstream_ini(port, extra="fail_timeout = 60s"))
    server.stop(signal.SIGKILL)
    # Each request tries it: nothing else could answer.
    assert [requests.get(proxy.url + "/echo", timeout=10).status_code for _ in range(3)] == [502] * 3
    start_upstream(port)
    assert port_of(proxy) == str(port)
    assert "out of rotation" not in proxy.log()
