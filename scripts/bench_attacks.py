"""`scripts/bench.py --attacks`: the longer run of the attack test
(tests/test_attacks.py): 500 slowloris connections (a head byte every 3 s)
and 500 slow-body connections (a body byte every 3 s) against one rproxy
worker with the default timeouts, for `--attack-seconds`, while 8 normal
keep-alive clients (tests/hostile.py load) fetch /echo from the test
upstream (tests/upstream.py).

Reports the normal clients' throughput under attack beside without, how
many attacking connections were cut and with what answer, and the worker's
RSS and open descriptors before, and after the attackers left.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench_common import (
    PYTHON,
    ROOT,
    Service,
    Stack,
    cpus,
    free_port,
    open_fds,
    rss_kib,
    say,
    start_rproxy,
    wait_port,
    worker_pid,
)

HOSTILE = ROOT / "tests" / "hostile.py"


def hostile(kind: str, port: int, **options) -> subprocess.Popen:
    args = [*cpus("load"), str(PYTHON), str(HOSTILE), kind, str(port)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def outcome(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(out.strip().splitlines()[-1])


def normal_load(port: int, seconds: float) -> dict:
    return outcome(hostile("load", port, count=8, duration=seconds), seconds + 60)


def run_attacks(tmp: Path, args) -> int:
    seconds = max(30.0, args.attack_seconds)
    upstream, port = free_port(), free_port()
    with Stack() as stack:
        stack.add(Service([*cpus("load"), str(PYTHON), str(ROOT / "tests" / "upstream.py"), "--port", str(upstream)],
                          tmp / "attack-upstream.out"))
        wait_port(upstream)
        proxy = stack.add(start_rproxy(tmp, port, upstream))
        worker = worker_pid(proxy.pid)
        before = normal_load(port, 10)
        rss_before, fds_before = rss_kib(worker), open_fds(worker)
        say(f"attacks: 500 slowloris + 500 slow-body connections for {seconds:g} s against one worker "
            "(default timeouts), 8 normal clients")
        attackers = [hostile(kind, port, count=500, interval=3, duration=seconds)
                     for kind in ("slowloris", "slowbody")]
        time.sleep(5)  # all 1,000 connected and dribbling
        during = normal_load(port, seconds - 10)
        rss_peak, fds_peak = rss_kib(worker), open_fds(worker)
        loris, body = (outcome(a, seconds + 60) for a in attackers)
        time.sleep(5)  # the attackers' connections closed: the worker lets them go
        after = normal_load(port, 10)
        rss_after, fds_after = rss_kib(worker), open_fds(worker)
    usual = (before["rate"] + after["rate"]) / 2
    say(f"\nnormal clients: {during['rate']:.0f} req/s under attack vs {usual:.0f} without "
        f"({during['rate'] / usual:.2f}); failed {during['failed']}, cut {during['cut']}, "
        f"hung {during['hung']}, wrong {during['wrong']}; p99 {during['p99_ms']} ms under attack "
        f"vs {before['p99_ms']} ms before")
    say(f"slowloris: {loris['opened']} connections opened, {loris['cut']} cut by the proxy "
        f"(answers {loris['answers']}, after {loris['lifetime_p50']} s median), {loris['still_open']} open at the end")
    say(f"slow body: {body['opened']} connections opened, {body['cut']} cut (answers {body['answers']}), "
        f"{body['still_open']} still sending at the end")
    say(f"worker: RSS {rss_before / 1024:.1f} MiB before, {rss_peak / 1024:.1f} MiB under attack, "
        f"{rss_after / 1024:.1f} MiB after; open fds {fds_before} before, {fds_peak} under attack, {fds_after} after")
    failed = during["failed"] + during["wrong"] + during["hung"]
    return 0 if failed == 0 else 1
