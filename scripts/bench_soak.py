"""`scripts/bench.py --soak MINUTES`: one rproxy worker under a steady mixed
load (scripts/bench_load.py: small, large, streaming and WebSocket) for
MINUTES, its RSS and open descriptors sampled every 10 s.

Passes when no request failed and, after the first minute (pools, buffers
and caches filling), RSS grew by less than 5%; open descriptors are
reported beside it (a leak shows as a climb).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from bench_common import (
    PYTHON,
    SCRIPTS,
    Stack,
    cpus,
    free_port,
    open_fds,
    rss_kib,
    say,
    start_bench_upstream,
    start_rproxy,
    start_upstream,
    worker_pid,
)

SAMPLE_EVERY = 10.0
WARM_UP = 60.0

LIVE_ROUTES = """
[upstream:live]
servers = 127.0.0.1:{live}
[route:stream]
path = /stream
upstream = live
[route:ws]
path = /ws
upstream = live
upgrade = websocket
"""


def run_soak(tmp: Path, args) -> int:
    seconds = args.soak * 60
    static, live, port = free_port(), free_port(), free_port()
    with Stack() as stack:
        stack.add(start_upstream(tmp, static))
        stack.add(start_bench_upstream(tmp, live))
        proxy = stack.add(start_rproxy(tmp, port, static, extra=LIVE_ROUTES.format(live=live)))
        worker = worker_pid(proxy.pid)
        say(f"soak: {args.soak:g} min of mixed load on one rproxy worker (pid {worker}), "
            f"RSS and fds every {SAMPLE_EVERY:g} s")
        load = subprocess.Popen([*cpus("load"), str(PYTHON), str(SCRIPTS / "bench_load.py"), str(port),
                                 "--duration", str(seconds)], stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        samples: list[tuple[float, int, int]] = []
        try:
            while load.poll() is None and time.monotonic() - started < seconds + 60:
                elapsed = time.monotonic() - started
                samples.append((elapsed, rss_kib(worker), open_fds(worker)))
                if len(samples) % 6 == 1:
                    say(f"  {elapsed:6.0f} s  RSS {samples[-1][1] / 1024:7.1f} MiB  fds {samples[-1][2]:5d}")
                time.sleep(SAMPLE_EVERY)
            out, _ = load.communicate(timeout=120)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
    return report(samples, json.loads(out.strip().splitlines()[-1]))


def report(samples: list[tuple[float, int, int]], load: dict) -> int:
    results, failures = load["results"], load["failures"]
    failed = sum(r["failed"] for r in results.values())
    say("\nsoak results")
    for kind, r in results.items():
        say(f"  {kind:<10} {r['ok']:>9} ok  {r['failed']:>4} failed")
    for failure in failures:
        say(f"  failure: {failure}")
    steady = [s for s in samples if s[0] >= WARM_UP] or samples
    base_rss, last_rss = steady[0][1], statistics.median(s[1] for s in steady[-3:])
    growth = (last_rss - base_rss) / base_rss * 100
    fds = [s[2] for s in steady]
    say(f"  RSS after the first minute {base_rss / 1024:.1f} MiB, at the end {last_rss / 1024:.1f} MiB "
        f"({growth:+.1f}%), peak {max(s[1] for s in samples) / 1024:.1f} MiB")
    say(f"  open fds after the first minute {fds[0]}, at the end {fds[-1]}, range {min(fds)}-{max(fds)}")
    ok = failed == 0 and growth < 5
    say(f"  {'PASS' if ok else 'FAIL'}: {failed} failed requests, RSS growth {growth:+.1f}% (limit 5%)")
    return 0 if ok else 1
