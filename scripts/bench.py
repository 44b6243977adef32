"""rproxy's benchmark: throughput, latency and memory beside nginx, the bare
gunicorn worker and other Python proxies, measured in one run.

    python3 scripts/bench.py --setup          install wrk, nginx, h2load (apt-get),
                                              rproxy into .venv and the peers into .bench-venv
    python3 scripts/bench.py                  the comparison table, then feature costs
    python3 scripts/bench.py --only table     just the table (throughput, p99, memory)
    python3 scripts/bench.py --only cache     cached hits beside hello and nginx proxy_cache
    python3 scripts/bench.py --compare REF    add rproxy as of git REF beside today's (A/B, repeatable)
    python3 scripts/bench.py --profile 10     py-spy on the rproxy worker under load
    python3 scripts/bench.py --soak 10        mixed load for 10 minutes, RSS and fds sampled
    python3 scripts/bench.py --attacks        1,000 dribbling connections against one worker

The table, one worker each, `wrk -t1 -c50`, interleaved round by round so
that every target sees the same machine (the load generator and upstreams
pinned to CPU 0, the proxies to CPU 1):
- nginx as a reverse proxy (upstream keepalive on), the reference;
- hello: gunicorn's gevent worker answering a 100-byte app itself, the
  ceiling of the stack rproxy runs on (hello-pyparser: the same on
  gunicorn's pure-Python request parser);
- rproxy, core features on (routing, forwarding headers, request id,
  access log), middleware off;
- WSGIProxy2 under gunicorn's gevent worker, and proxy.py's reverse proxy
  (when `--setup` installed them);
with 100-byte and 1 MiB responses from an nginx upstream; p99 latency at a
fixed rate (`--rate`, wrk pacing each connection); and memory per idle
keep-alive client and per held streaming response (RSS growth of the worker
with `--memory-clients` connections, divided by their number), and whether
`--many-clients` keep-alive clients on one rproxy worker all get answers.

Cached hits (`--only cache`, bench_cache.py): memory hits of 100 B beside
hello, disk and memory hits of 1 MiB beside nginx's proxy_cache.

Feature costs (middleware, metrics and JSON logs, tunnels, HTTPS/HTTP/2)
follow, each beside nginx or beside rproxy with the feature off.
Results are printed; nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_peers
from bench_common import (
    GUNICORN,
    Stack,
    compared,
    free_port,
    interleave,
    median,
    raise_fd_limit,
    say,
    source_tree,
    start_bench_upstream,
    start_nginx_proxy,
    start_rproxy,
    start_upstream,
    worker_pid,
    wrk,
)
from bench_memory import many_clients, per_connection_kib

SECTIONS = ("table", "cache", "middleware", "observability", "tunnels", "tls")


def ensure_tools() -> None:
    missing = [p for p in ("wrk", "nginx") if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing or not GUNICORN.exists():
        sys.exit(f"bench needs {' '.join(missing) or 'rproxy in .venv'}: run scripts/bench.py --setup first")


def rate_script(tmp: Path, rate: float, connections: int) -> Path:
    """A wrk script that paces every connection so that together they send
    about `rate` requests a second (closed loop: a slow answer delays its
    connection's next request)."""
    pause = connections / rate * 1000
    script = tmp / "rate.lua"
    script.write_text(f"function delay() return math.random({pause * 0.5:.0f}, {pause * 1.5:.0f}) end\n")
    return script


def start_targets(stack: Stack, tmp: Path, upstream: int, args, peers: bool) -> dict[str, int]:
    """The proxies of the table, each on its own port: name -> port."""
    ports = {"nginx": free_port(), "hello": free_port(), "hello-pyparser": free_port(), "rproxy": free_port()}
    stack.add(start_nginx_proxy(tmp, ports["nginx"], upstream))
    stack.add(bench_peers.start_hello(tmp, ports["hello"]))
    stack.add(bench_peers.start_hello(tmp, ports["hello-pyparser"], python_parser=True))
    stack.add(start_rproxy(tmp, ports["rproxy"], upstream))
    for name, ref, gunicorn_args in compared(args):
        ports[name] = free_port()
        stack.add(start_rproxy(tmp, ports[name], upstream, tree=source_tree(tmp, ref), gunicorn_args=gunicorn_args))
    if peers:
        ports["wsgiproxy2"], ports["proxy.py"] = free_port(), free_port()
        stack.add(bench_peers.start_wsgiproxy2(tmp, ports["wsgiproxy2"], upstream))
        stack.add(bench_peers.start_proxypy(tmp, ports["proxy.py"], upstream))
    return ports


def measure_memory(tmp: Path, args, peers: bool) -> dict[str, tuple]:
    """(KiB per idle keep-alive client, KiB per held stream) per proxy, one
    at a time in front of the bench upstream (which can hold streams).
    hello gets the idle figure only (it holds no streams): what the bare
    gunicorn gevent worker spends on a keep-alive connection, the floor
    under rproxy's."""
    starters = {
        "nginx": lambda port, up: start_nginx_proxy(tmp, port, up),
        "hello": lambda port, up: bench_peers.start_hello(tmp, port),
        "rproxy": lambda port, up: start_rproxy(tmp, port, up),
    }
    for name, ref, gunicorn_args in compared(args):
        starters[name] = (lambda tree, extra: lambda port, up: start_rproxy(
            tmp, port, up, tree=tree, gunicorn_args=extra))(source_tree(tmp, ref), gunicorn_args)
    if peers:
        starters["wsgiproxy2"] = lambda port, up: bench_peers.start_wsgiproxy2(tmp, port, up)
    memory = {}
    with Stack() as upstream_stack:
        upstream = free_port()
        upstream_stack.add(start_bench_upstream(tmp, upstream))
        for target, start in starters.items():
            port = free_port()
            with Stack() as stack:
                service = stack.add(start(port, upstream))
                idle = per_connection_kib(port, service.pid, args.memory_clients, held=False)
                held = (per_connection_kib(port, service.pid, args.memory_clients, held=True)
                        if target != "hello" else (None, "—"))
            memory[target] = (idle, held)
            say(f"  memory {target}: idle keep-alive {fmt_kib(idle)} KiB, held stream {fmt_kib(held)} KiB")
    return memory


def fmt_kib(value: tuple) -> str:
    kib, note = value
    return note if kib is None else f"{kib:.1f}"


def run_table(tmp: Path, args) -> None:
    peers = bench_peers.peers_installed() and not args.no_peers
    if not peers and not args.no_peers:
        say("(WSGIProxy2 and proxy.py are not installed: `scripts/bench.py --setup` adds them)")
    up = free_port()
    with Stack() as stack:
        stack.add(start_upstream(tmp, up))
        ports = start_targets(stack, tmp, up, args, peers)
        url = {t: f"http://127.0.0.1:{p}" for t, p in ports.items()}
        say(f"table: {args.rounds} rounds of {args.duration:g} s per target, wrk -t1 -c{args.connections}")
        small = interleave({t: f"{u}/100B" for t, u in url.items()}, args)
        large = interleave({t: f"{u}/1MiB" for t, u in url.items() if not t.startswith("hello")}, args)
        paced = interleave({t: f"{u}/100B" for t, u in url.items()}, args,
                           script=rate_script(tmp, args.rate, args.connections))
    memory = measure_memory(tmp, args, peers) if args.memory_clients else {}
    many = ""
    if args.many_clients:
        with Stack() as stack:
            up, port = free_port(), free_port()
            stack.add(start_upstream(tmp, up))
            # Up to one upstream connection per waiting request would take
            # twice the descriptors a process may have here: a capped pool.
            stack.add(start_rproxy(tmp, port, up, upstream_extra="max_connections = 500\nconnect_timeout = 60s"))
            many = many_clients(port, args.many_clients)
    print_table(small, large, paced, memory, many, args)


def print_table(small, large, paced, memory, many, args) -> None:
    ng, hello = median(small["nginx"], "rps"), median(small["hello"], "rps")
    ng_large, ng_p99 = median(large["nginx"], "rps"), median(paced["nginx"], "p99")
    say(f"\n1 worker each, wrk -t1 -c{args.connections}, medians of {args.rounds} interleaved rounds of "
        f"{args.duration:g} s; p99 at ~{args.rate:g} req/s; memory with {args.memory_clients} connections")
    say("| target | 100 B req/s | × nginx | × hello | p99 ms | 1 MiB req/s | × nginx | "
        f"p99 ms at {args.rate:g}/s | × nginx p99 | KiB per idle keep-alive client | KiB per held stream | errors |")
    say("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for target, runs in small.items():
        rps, p99 = median(runs, "rps"), median(runs, "p99")
        big = large.get(target)
        big_cells = f"{median(big, 'rps'):.0f} | {median(big, 'rps') / ng_large:.2f}" if big else "— | —"
        rate_p99 = median(paced[target], "p99")
        mem = memory.get(target)
        mem_cells = f"{fmt_kib(mem[0])} | {fmt_kib(mem[1])}" if mem else "— | —"
        errors = "; ".join(r["errors"] for kind in (small, large, paced) for r in kind.get(target, ()) if r["errors"])
        say(f"| {target} | {rps:.0f} | {rps / ng:.3f} | {rps / hello:.2f} | {p99:.2f} | {big_cells} | "
            f"{rate_p99:.2f} | {rate_p99 / ng_p99:.2f} | {mem_cells} | {errors} |")
    if many:
        say(f"\n{args.many_clients} concurrent keep-alive clients on one rproxy worker: {many} answered")
    best_peer = max((median(small[t], "rps") for t in ("wsgiproxy2", "proxy.py") if t in small), default=None)
    rp = median(small["rproxy"], "rps")
    rate_p99 = median(paced["rproxy"], "p99")
    idle = memory.get("rproxy", ((None, ""),))[0][0]
    hello_idle = memory.get("hello", ((None, ""),))[0][0]
    say(f"\nrproxy: {rp / hello:.2f}× hello (target ≥ 0.75), 1 MiB {median(large['rproxy'], 'rps') / ng_large:.2f}× "
        f"nginx (target ≥ 1.0), p99 at {args.rate:g}/s {rate_p99 / median(paced['hello'], 'p99'):.2f}× hello's "
        f"(target ≤ 1.2; {rate_p99 / ng_p99:.2f}× nginx's)"
        + (f", {rp / best_peer:.1f}× the best Python peer (target ≥ 2)" if best_peer else "")
        + (f", {idle:.1f} KiB per idle client (target ≤ 9; hello {hello_idle:.1f})"
           if idle is not None and hello_idle is not None else ""))


def run_profile(tmp: Path, args) -> None:
    """py-spy (from .bench-venv) on the rproxy worker under 100-byte load:
    the functions where its CPU goes, by own and by inclusive samples."""
    py_spy = bench_peers.PEERS_VENV / "bin" / "py-spy"
    if not py_spy.exists():
        sys.exit("--profile needs py-spy: run scripts/bench.py --setup")
    up, port = free_port(), free_port()
    with Stack() as stack:
        stack.add(start_upstream(tmp, up))
        proxy = stack.add(start_rproxy(tmp, port, up))
        worker = worker_pid(proxy.pid)
        wrk(f"http://127.0.0.1:{port}/100B", 2, args.connections)
        raw = tmp / "profile.txt"
        spy = subprocess.Popen([str(py_spy), "record", "-p", str(worker), "-d", str(args.profile), "-r", "250",
                                "-f", "raw", "-o", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = wrk(f"http://127.0.0.1:{port}/100B", args.profile + 1, args.connections)
        spy.wait(timeout=args.profile + 60)
    say(f"rproxy under wrk -c{args.connections}, 100-byte responses: {result['rps']:.0f} req/s")
    print_profile(raw, args.profile_top)


def print_profile(raw: Path, top: int) -> None:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    for title, table in (("own samples", own), ("inclusive samples", inclusive)):
        say(f"\n{title} (% of {total} on-CPU samples)")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            say(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--setup", action="store_true", help="install what the benchmark needs, then exit")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rate", type=float, default=500, help="req/s of the fixed-rate latency runs")
    parser.add_argument("--memory-clients", type=int, default=1000,
                        help="connections for the memory figures (0: skip them)")
    parser.add_argument("--many-clients", type=int, default=10000,
                        help="keep-alive clients on one rproxy worker at once (0: skip)")
    parser.add_argument("--only", help=f"comma-separated sections to run, of {', '.join(SECTIONS)}")
    for section in SECTIONS[1:]:
        parser.add_argument(f"--no-{section}", action="store_true", help=f"skip the {section} section")
    parser.add_argument("--no-http", action="store_true", help="skip the table (as --no-table)")
    parser.add_argument("--no-peers", action="store_true", help="leave WSGIProxy2 and proxy.py out of the table")
    parser.add_argument("--compare", metavar="'REF [FLAGS]'", action="append",
                        help="also run rproxy as of this git ref, with these gunicorn flags if given "
                             "(A/B; repeatable), e.g. --compare 'HEAD --http-parser python'")
    parser.add_argument("--profile", type=int, metavar="SECONDS", help="profile the rproxy worker, then exit")
    parser.add_argument("--profile-top", type=int, default=40)
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="run the soak test alone")
    parser.add_argument("--attacks", action="store_true", help="run the attack section alone")
    parser.add_argument("--attack-seconds", type=float, default=60)
    parser.add_argument("--idle-tunnels", type=int, default=5000)
    args = parser.parse_args()
    if args.setup:
        bench_peers.setup()
        return 0
    ensure_tools()
    raise_fd_limit()
    say(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min), "
        f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="rproxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user
        if args.profile:
            run_profile(tmp, args)
            return 0
        if args.soak:
            from bench_soak import run_soak
            return run_soak(tmp, args)
        if args.attacks:
            from bench_attacks import run_attacks
            return run_attacks(tmp, args)
        chosen = args.only.split(",") if args.only else [
            s for s in SECTIONS if not getattr(args, f"no_{s}", False) and not (s == "table" and args.no_http)]
        unknown = set(chosen) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
        import bench_features
        for section in chosen:
            if section == "table":
                run_table(tmp, args)
            elif section == "cache":
                from bench_cache import run_cache
                run_cache(tmp, args)
            elif section == "tls":
                from bench_tls import run_tls
                run_tls(tmp, args)
            else:
                getattr(bench_features, f"run_{section}")(tmp, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
