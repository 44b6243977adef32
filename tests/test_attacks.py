"""Attacks under load: normal clients keep their throughput while hostile
ones are cut at their timeouts. The clients run as their own processes
(tests/hostile.py) so that none shares a GIL with what it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import REPO, single_route

HOSTILE = [sys.executable, str(REPO / "tests" / "hostile.py")]
# The proxy's worker gets a core to itself; clients and upstream share the
# other, so that what is measured is the proxy's capacity.
PROXY_CPU, OTHERS_CPU = ({1}, {0}) if (os.cpu_count() or 1) > 1 else ({0}, {0})


def pin_others() -> None:
    os.sched_setaffinity(0, OTHERS_CPU)


def run(kind: str, port: int, **options) -> subprocess.Popen:
    args = [*HOSTILE, kind, str(port)]
    for key, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            args += [f"--{key}", str(item)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, preexec_fn=pin_others)


def result(proc: subprocess.Popen, timeout: float = 60) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def load(port: int, seconds: float, worker=None) -> dict:
    """Normal clients for `seconds`; with `worker`, also the worker's CPU seconds meanwhile."""
    cpu = sum(worker.cpu_times()[:2]) if worker else 0.0
    outcome = result(run("load", port, count=8, duration=seconds))
    if worker:
        outcome["cpu"] = sum(worker.cpu_times()[:2]) - cpu
    return outcome


def test_slowloris_and_slow_bodies_leave_normal_clients_their_throughput(start_proxy, start_upstream,
                                                                          hardening_record):
    """1,000 connections dribbling a byte every 3 s against one worker with
    the default timeouts: the head dribblers are cut at client_header_timeout
    (10 s) and come back; the body dribblers (cut only after client_timeout
    + 64 KiB at min_body_rate, see test_client_limits) hold no upstream
    connection meanwhile."""
    upstream = start_upstream()
    proxy = start_proxy(single_route(upstream.port))
    worker = proxy.workers()[0]
    worker.cpu_affinity(list(PROXY_CPU))
    os.sched_setaffinity(upstream.pid, OTHERS_CPU)
    before = load(proxy.port, 3, worker)
    fds_before = worker.num_fds()
    attackers = [run("slowloris", proxy.port, count=500, interval=3, duration=17),
                 run("slowbody", proxy.port, count=500, interval=3, duration=17)]
    try:
        time.sleep(3)  # all 1,000 connected and dribbling
        during = load(proxy.port, 12, worker)  # the first wave of cuts, at 10 s, falls in it
        held_upstream = upstream.stats()["open"]
        loris, body = (result(a) for a in attackers)
    finally:
        for a in attackers:
            a.kill()
    after = load(proxy.port, 3)
    usual = (before["rate"] + after["rate"]) / 2
    ratio = during["rate"] / usual
    # What the attack costs the worker, in the worker's own CPU time, so that
    # other processes on the machine do not blur it: what it spent beyond
    # serving the normal requests at their usual cost. The worker's capacity
    # left for normal clients is the rest.
    per_request = before["cpu"] / (before["ok"] + before["failed"])
    attack_share = max(0.0, during["cpu"] - per_request * (during["ok"] + during["failed"])) / 12
    capacity = 1 - attack_share
    hardening_record(("slowloris: a head byte every 3 s, default client_header_timeout (10 s)",
                      "500 connections, replaced when cut",
                      f"{loris['cut']} cut, answers {loris['answers']}, after {loris['lifetime_p50']} s (median)"))
    hardening_record(("slow body: a body byte every 3 s, default timeouts",
                      "500 connections", f"{body['still_open']} still waiting after 17 s; upstream "
                      f"connections held meanwhile: {held_upstream - 1} (the 8 load clients')"))
    hardening_record(("normal clients during both attacks", "8 keep-alive clients, one worker",
                      f"{during['rate']:.0f} req/s vs {usual:.0f} without attack ({ratio:.2f}), "
                      f"{during['failed']} failed; the attack took {attack_share:.1%} of the worker's CPU, "
                      f"leaving {capacity:.2f} of its capacity"))
    assert loris["cut"] >= 500 and set(loris["answers"]) == {"408"}, loris
    assert 9.5 <= loris["lifetime_p50"] and loris["lifetime_max"] < 12, loris
    assert body["still_open"] == 500 and body["cut"] == 0, body
    assert held_upstream <= 9  # the load's eight and this stats request: none for attackers
    assert before["failed"] == during["failed"] == after["failed"] == 0
    # The worker's own CPU blurs too when the machine is busy: the same
    # attack measured 0.98 on an idle machine and 0.91 (this code and the
    # code before this round alike) with other test runs beside it.
    assert capacity >= 0.8, (before, during, attack_share)
    # Measured throughput moves with whatever else runs on the machine (0.58
    # was seen with other test runs starting beside it, while the worker's own
    # CPU said 0.98 of it was left): the capacity above is the measure, this
    # only catches starvation, with a margin such load cannot eat.
    assert ratio >= 0.3, (before, during, after)
    # What the attackers held is given back.
    deadline = time.monotonic() + 10
    while worker.num_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.num_fds() <= fds_before + 2
