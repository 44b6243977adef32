"""Cached-hit throughput for scripts/bench.py (`--only cache`), one worker
each, interleaved round by round so that every target sees the same machine:

- 100 B: rproxy answering from its memory cache beside the same gunicorn
  gevent worker answering hello-world itself (the ceiling of the stack),
  and nginx's proxy_cache hit;
- 1 MiB: rproxy answering from its disk cache (file://) and from memory
  beside nginx's proxy_cache hit (proxy_cache_path in the run's temporary
  directory, the same upstream).

`--compare REF` adds rproxy as of a git ref answering from its memory cache
and from its disk cache.

Every cache is filled and checked to answer hits (X-Cache) before the runs.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import bench_peers
from bench_common import Stack, compared, free_port, interleave, median, say, source_tree, start_rproxy, start_upstream
from bench_features import start_nginx_cache

TARGET_MEMORY = 0.9  # memory hits, 100 B, × hello-world
TARGET_DISK = 0.8    # disk hits, 1 MiB, × nginx proxy_cache


def cache_status(url: str) -> str:
    """What the cache in front said about a second request for `url`."""
    for _ in range(2):
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
            status = answer.headers.get("X-Cache", "")
    return status


def run_cache(tmp: Path, args) -> None:
    up = free_port()
    ports = {name: free_port() for name in ("hello", "nginx hit", "rproxy memory hit", "rproxy disk hit")}
    with Stack() as stack:
        stack.add(start_upstream(tmp, up))
        stack.add(bench_peers.start_hello(tmp, ports["hello"]))
        stack.add(start_nginx_cache(tmp, ports["nginx hit"], up))
        stack.add(start_rproxy(tmp, ports["rproxy memory hit"], up, extra="[cache]\n"))
        stack.add(start_rproxy(tmp, ports["rproxy disk hit"], up,
                               extra=f"[cache]\nstorage = file://{tmp}/rproxy-cache\n"))
        for name, ref, gunicorn_args in compared(args):  # --compare REF: its hits beside today's (A/B)
            tree = source_tree(tmp, ref)
            ports[f"{name} memory hit"] = port = free_port()
            stack.add(start_rproxy(tmp, port, up, tree=tree, gunicorn_args=gunicorn_args, extra="[cache]\n"))
            ports[f"{name} disk hit"] = port = free_port()
            stack.add(start_rproxy(tmp, port, up, tree=tree, gunicorn_args=gunicorn_args,
                                   extra=f"[cache]\nstorage = file://{tmp}/rproxy-cache-{port}\n"))
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for name, base in url.items():
            if name != "hello":
                for body in ("100B", "1MiB"):
                    status = cache_status(f"{base}/cached/{body}")
                    if status != "HIT":
                        raise SystemExit(f"{name} answers {body} with X-Cache {status!r}, not a hit")
        say(f"cache hits: {args.rounds} rounds of {args.duration:g} s per target, wrk -t1 -c{args.connections}")
        # One interleaved run: every target, both sizes, round after round.
        # hello answers any path with its 100 bytes; the caches get /cached/ (max-age=600).
        runs = interleave({**{f"{n} 100B": f"{u}/cached/100B" for n, u in url.items()},
                           **{f"{n} 1MiB": f"{u}/cached/1MiB" for n, u in url.items() if n != "hello"}}, args)
    rps = {name: median(r, "rps") for name, r in runs.items()}
    hello, nginx_large = rps["hello 100B"], rps["nginx hit 1MiB"]
    say(f"\ncached hits, 1 worker each, wrk -t1 -c{args.connections}, medians of {args.rounds} "
        f"interleaved rounds of {args.duration:g} s")
    say("| target | 100 B req/s | × hello | p99 ms | 1 MiB req/s | × nginx hit | p99 ms | errors |")
    say("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in url:
        small, large = runs[f"{name} 100B"], runs.get(f"{name} 1MiB")
        large_cells = (f"{rps[f'{name} 1MiB']:.0f} | {rps[f'{name} 1MiB'] / nginx_large:.2f} | "
                       f"{median(large, 'p99'):.2f}") if large else "— | — | —"
        errors = "; ".join(r["errors"] for r in small + (large or []) if r["errors"])
        say(f"| {name} | {rps[f'{name} 100B']:.0f} | {rps[f'{name} 100B'] / hello:.2f} | "
            f"{median(small, 'p99'):.2f} | {large_cells} | {errors} |")
    say(f"\nrproxy memory hit 100 B: {rps['rproxy memory hit 100B'] / hello:.2f}× hello (target ≥ {TARGET_MEMORY}); "
        f"disk hit 1 MiB: {rps['rproxy disk hit 1MiB'] / nginx_large:.2f}× nginx proxy_cache "
        f"(target ≥ {TARGET_DISK})")
