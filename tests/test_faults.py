"""Upstream faults under a steady load: servers killed and restarted, hung,
cutting responses mid-body, and a full pool. No request hangs past its
timeouts, every client gets a response or a cut connection (never a wrong
body), the pool recovers, and the worker's fds and memory come back."""

from __future__ import annotations

import os
import signal
import threading
import time

import requests
from test_attacks import OTHERS_CPU, result, run

# Bodies checked byte for byte by the load client; /abort is cut by the upstream mid-body.
MIX = ["/bytes?n=20000", "/bytes?n=300000", "/echo", "/abort?n=50000"]
CLEAN = ["/bytes?n=20000", "/bytes?n=300000", "/echo"]


def own_fds(worker, *upstreams) -> int:
    """The worker's descriptors but its idle pooled upstream connections,
    whose number legitimately varies (up to pool_size per server)."""
    pooled = sum(u.stats()["open"] - 1 for u in upstreams)  # -1: the stats request itself
    return worker.num_fds() - pooled


def test_faults_under_load(start_proxy, start_upstream, hardening_record):
    a, b = start_upstream(), start_upstream()
    for server in (a, b):
        os.sched_setaffinity(server.pid, OTHERS_CPU)
    proxy = start_proxy(f"""
        [upstream:app]
        servers = 127.0.0.1:{a.port} 127.0.0.1:{b.port}
        connect_timeout = 1s
        read_timeout = 2s
        pool_size = 8
        max_connections = 8
        fail_timeout = 2s
        health_check = GET /healthz
        health_interval = 1s

        [route:default]
        path = /
        upstream = app
        """)
    worker = proxy.workers()[0]
    warm = result(run("load", proxy.port, count=8, duration=2, path=CLEAN))
    assert warm["failed"] == warm["cut"] == warm["wrong"] == 0, warm
    fds_before, rss_before = own_fds(worker, a, b), worker.memory_info().rss

    steady = run("load", proxy.port, count=8, duration=16, path=MIX)
    events = []

    def flood_the_pool():
        # 40 slow requests for 16 pooled connections: the rest wait connect_timeout at
        # each server, then 503.
        def one():
            try:
                events.append(requests.get(proxy.url + "/slow?delay=1.8", timeout=15).status_code)
            except requests.RequestException as e:
                events.append(type(e).__name__)
        threads = [threading.Thread(target=one) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    time.sleep(1)
    a.stop(signal.SIGKILL)                      # t=1 s: a server dies
    time.sleep(2)
    a = start_upstream(a.port)                  # t=3 s: and comes back
    os.sched_setaffinity(a.pid, OTHERS_CPU)
    time.sleep(2)
    os.kill(b.pid, signal.SIGSTOP)              # t=5 s: the other hangs (accepts, never answers)
    time.sleep(3)
    os.kill(b.pid, signal.SIGCONT)              # t=8 s: and wakes up
    time.sleep(2)
    flood_the_pool()                            # t=10 s: more requests than connections
    during = result(steady)

    time.sleep(2.5)  # fail_timeout: both servers back in rotation
    after = result(run("load", proxy.port, count=8, duration=3, path=CLEAN))
    deadline = time.monotonic() + 10
    while own_fds(worker, a, b) > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    fds_after, rss_after = own_fds(worker, a, b), worker.memory_info().rss

    hardening_record(("upstream killed (SIGKILL) and restarted, the other hung (SIGSTOP) 3 s, responses cut "
                      "mid-body, pool flooded; under 8 looping clients", f"{sum(during['statuses'].values()) + during['cut']} requests in 16 s",
                      f"statuses {during['statuses']}, {during['cut']} cut connections, {during['wrong']} wrong "
                      f"bodies, {during['hung']} hung; slowest {during['max_ms']:.0f} ms"))
    hardening_record(("pool flood: 40 slow requests for 16 connections", "40",
                      ", ".join(f"{events.count(v)} x {v}" for v in sorted(set(events), key=str))))
    hardening_record(("after the faults", f"{after['ok']} requests in 3 s",
                      f"{after['failed']} failed, {after['cut']} cut; fds but pooled ones {fds_before} -> {fds_after}, "
                      f"RSS +{(rss_after - rss_before) / 2**20:.1f} MiB"))

    assert during["wrong"] == 0 and during["hung"] == 0, during
    # Nothing waits past connect + read timeouts and one retry (1 + 2 + 1 + 2 s).
    assert during["max_ms"] < 7000, during
    assert during["ok"] > 0 and set(during["statuses"]) <= {"200", "502", "503", "504"}, during
    assert set(events) <= {200, 503} and 200 in events and 503 in events, events
    assert after["failed"] == after["cut"] == after["wrong"] == after["hung"] == 0, after
    assert fds_after <= fds_before + 2
    assert rss_after - rss_before < 16 << 20
