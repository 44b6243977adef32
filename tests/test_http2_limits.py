"""What one HTTP/2 client connection can hold upstream, and what it costs
when it misbehaves: clients that take no response bytes (a receive window of
0), streams reset while they wait on the upstream, the rapid reset flood, and
the per-server connection cap they all run into."""

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import REPO, single_route
from h2client import RawH2
from test_http2 import https, tls, trusting

from rproxy.server.http2 import RESET_GRACE

LARGE = "/bytes?n=50000000"


def upstream_connections(proxy, upstream) -> int:
    """The worker's open connections to the upstream server, as the kernel
    lists them: the ones it holds, whatever the upstream is doing."""
    worker = proxy.workers()[0]
    return sum(1 for c in worker.net_connections(kind="tcp")
               if c.raddr and c.raddr.port == upstream.port and c.status == "ESTABLISHED")


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def open_streams(conn: RawH2, path: str, count: int) -> list[int]:
    return [conn.request("GET", path) for _ in range(count)]


def test_clients_taking_no_response_bytes_hold_a_bounded_number_of_upstream_connections_until_client_timeout(
        start_proxy, start_upstream, certs, hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port),
                        server=tls(certs, http2_max_concurrent_streams="8", client_timeout="2s"))
    worker = proxy.workers()[0]
    rss_before = worker.memory_info().rss
    # Three clients, each with every stream it may open on a large response,
    # none of which it lets the proxy send a byte of.
    stalled = [RawH2(proxy.port, certs.ca_file, window=0) for _ in range(3)]
    try:
        streams = [open_streams(conn, LARGE, 8) for conn in stalled]
        started = time.monotonic()
        wait_until(lambda: upstream_connections(proxy, upstream) >= 24, 10, "24 upstream connections taken")
        time.sleep(0.3)
        assert upstream_connections(proxy, upstream) == 24  # 8 per client connection, never more
        rss_held = worker.memory_info().rss
        # Other clients are served meanwhile.
        with httpx.Client(http2=True, verify=trusting(certs.ca_file), timeout=10) as c:
            r = c.get(https(proxy) + "/echo")
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        # client_timeout later each stalled stream is reset and its upstream
        # connection closed; the client sees the reset.
        for conn, ids in zip(stalled, streams):
            for stream_id in ids:
                answer = conn.response(stream_id)
                assert answer["status"] == 200 and answer["reset"] == 0x8 and answer["body"] == b""
        freed_after = time.monotonic() - started
        wait_until(lambda: upstream_connections(proxy, upstream) <= 1, 10,
                   "the stalled streams' upstream connections closed")  # the /echo one stays pooled
    finally:
        for conn in stalled:
            conn.close()
    assert 1.5 < freed_after < 10
    assert len(proxy.log_lines(r"took no bytes of the response of GET /bytes\?n=50000000 for 2s")) == 24
    growth = (rss_held - rss_before) / 2**20
    hardening_record(("HTTP/2 clients with a receive window of 0, every stream on a 50 MB response "
                      "(http2_max_concurrent_streams 8, client_timeout 2s)", "3 connections x 8 streams",
                      f"24 upstream connections held (8 per client connection), worker RSS +{growth:.1f} MiB; "
                      f"a normal client served meanwhile; all reset and their upstream connections closed "
                      f"after {freed_after:.1f} s, logged"))


def test_streams_beyond_max_connections_wait_connect_timeout_then_get_503(start_proxy, start_upstream, certs):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port, upstream_extra="max_connections = 4\nconnect_timeout = 1s"),
                        server=tls(certs, http2_max_concurrent_streams="8", client_timeout="3s"))
    conn = RawH2(proxy.port, certs.ca_file, window=0)
    try:
        ids = open_streams(conn, LARGE, 8)
        wait_until(lambda: upstream_connections(proxy, upstream) == 4, 10, "4 upstream connections")
        statuses = []
        for stream_id in ids:
            answer = conn.response(stream_id)
            statuses.append(answer["status"])
            assert upstream_connections(proxy, upstream) <= 4
    finally:
        conn.close()
    assert sorted(statuses) == [200] * 4 + [503] * 4
    assert len(proxy.log_lines(r"WARNING.*: upstream server is at max_connections")) == 4


def test_requests_beyond_max_connections_are_served_in_turn(start_proxy, start_upstream):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port, upstream_extra="max_connections = 2\nconnect_timeout = 10s"))
    results, peak = [], [0]

    def get():
        results.append(httpx.get(proxy.url + "/slow?delay=1", timeout=30).status_code)

    threads = [threading.Thread(target=get) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.monotonic() - started < 30:
        peak[0] = max(peak[0], upstream_connections(proxy, upstream))
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert results == [200] * 4
    assert peak[0] <= 2
    assert time.monotonic() - started >= 1.9  # two at a time: two rounds of 1 s


def test_max_connections_has_a_default():
    from rproxy import config
    assert config.UpstreamConfig.__dataclass_fields__["max_connections"].default == 1024


@pytest.mark.parametrize("how", ["reset", "disconnect"])
def test_a_client_leaving_releases_the_upstream_connections_of_its_streams_at_once(
        start_proxy, start_upstream, certs, how):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server=tls(certs, http2_max_concurrent_streams="8"))
    conn = RawH2(proxy.port, certs.ca_file)
    ids = open_streams(conn, "/slow?delay=30", 8)
    wait_until(lambda: upstream_connections(proxy, upstream) == 8, 10, "8 upstream requests under way")
    left = time.monotonic()
    if how == "reset":
        for stream_id in ids:
            conn.reset(stream_id)
    else:
        conn.sock.close()
    wait_until(lambda: upstream_connections(proxy, upstream) == 0, 10, "upstream connections released")
    released = time.monotonic() - left
    assert released < 5, released  # not the 30 s the upstream takes
    if how == "reset":
        # The connection goes on, and the upstream was not held responsible.
        answer = conn.response(conn.request("GET", "/echo"))
        assert answer["status"] == 200
        conn.close()
    assert "out of rotation" not in proxy.log()


def rapid_reset(port: int, seconds: float, ca_file: str, path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests" / "h2client.py"), "rapid-reset", str(port),
                             "--seconds", str(seconds), "--cafile", ca_file, "--path", path],
                            stdout=subprocess.PIPE, text=True)


def test_rapid_reset_flood_is_cut_off_and_normal_clients_are_served(start_proxy, start_upstream, certs,
                                                                    hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server=tls(certs))
    worker = proxy.workers()[0]
    seconds = 5
    before = worker.cpu_times()
    wall = time.monotonic()
    flood = rapid_reset(proxy.port, seconds, certs.ca_file, "/echo")
    served = []
    try:
        with httpx.Client(http2=True, verify=trusting(certs.ca_file), timeout=10) as c:
            while flood.poll() is None and time.monotonic() - wall < seconds + 30:
                served.append(c.get(https(proxy) + "/echo").status_code)
                time.sleep(0.1)
        out, _ = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    after = worker.cpu_times()
    wall = time.monotonic() - wall
    result = json.loads(out.strip().splitlines()[-1])
    cpu = (after.user + after.system) - (before.user + before.system)
    # The reset limit holds: the flooding connections are closed with
    # ENHANCE_YOUR_CALM, and the client has to open new ones.
    assert result["goaway"].get("ENHANCE_YOUR_CALM", 0) + result["connections"] > 2, result
    assert served and set(served) == {200}
    per_thousand = cpu / result["streams"] * 1000
    assert per_thousand < 2.0, (cpu, result)  # about 0.3 s on a 2-core machine
    hardening_record(("HTTP/2 rapid reset: 20 requests, then RST_STREAM for each 20 ms later, in a loop "
                      f"for {seconds} s (TLS, /echo)", f"{result['streams']} streams on "
                      f"{result['connections']} connections",
                      f"connections closed with GOAWAY ENHANCE_YOUR_CALM after 200 resets; worker CPU "
                      f"{cpu:.2f} s in {wall:.1f} s ({per_thousand:.2f} s per 1000 streams); "
                      f"{len(served)} normal requests served meanwhile, all 200"))


def test_rapid_reset_on_a_slow_upstream_holds_no_upstream_connection_after(start_proxy, start_upstream, certs,
                                                                           hardening_record):
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port), server=tls(certs))
    flood = rapid_reset(proxy.port, 4, certs.ca_file, "/slow?delay=10")
    peak = 0
    try:
        while flood.poll() is None:
            peak = max(peak, upstream_connections(proxy, upstream))
            time.sleep(0.05)
        out, _ = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait()
    result = json.loads(out.strip().splitlines()[-1])
    ended = time.monotonic()
    wait_until(lambda: upstream_connections(proxy, upstream) == 0, 10, "no upstream connection held")
    released = time.monotonic() - ended
    # One connection floods at a time, each holding at most
    # http2_max_concurrent_streams (32); a closed one's streams are cut a
    # moment after its successor's begin.
    assert peak <= 2 * 32
    assert released < 5  # not the 10 s the upstream takes
    hardening_record(("HTTP/2 rapid reset against an upstream that takes 10 s to answer", f"{result['streams']} "
                      f"streams in 4 s", f"at most {peak} upstream connections held at once, none "
                      f"{released:.1f} s after the flood: a reset stream's upstream connection is closed "
                      f"{RESET_GRACE:g} s after the reset"))
