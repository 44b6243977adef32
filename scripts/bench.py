"""Throughput and latency of rproxy beside nginx, measured in one run.

    python3 scripts/bench.py [--duration 5] [--rounds 3] [--connections 50]

Set-up, once: `apt-get install wrk nginx` (run as root, the script does it
itself when they are missing) and `pip install -e .` into .venv. The
upstream is nginx serving static bodies of 100 bytes and 1 MiB. The same wrk
load runs against it directly, through nginx as a reverse proxy (upstream
keepalive on) and through rproxy, interleaved round by round so that both
proxies see the same machine; with 1 and 2 workers each. wrk and the
upstream are pinned to CPU 0, the proxies to CPU 1 (when there are two).
Prints req/s and p50/p99 latency (medians over the rounds) and the ratios
rproxy/nginx and rproxy/direct.

Middleware: throughput with rate limit, filter, cache and security headers on
versus none (a response the cache may not store), and the cache-hit path
versus nginx's proxy_cache hit.

HTTPS and HTTP/2 (scripts/bench_tls.py): keep-alive throughput, new-handshake
rate and h2load throughput, rproxy beside nginx on the same certificate.

Tunnels (on by default): an upgrade-echo upstream; tunnel
throughput (MB/s, one tunnel echoing 256 MiB) direct, through nginx as a
WebSocket proxy and through rproxy, interleaved; and worker memory per idle
tunnel (RSS growth of the one worker with `--idle-tunnels` open, divided by
their number).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
BODIES = {"100B": 100, "1MiB": 1 << 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def ensure_tools() -> None:
    missing = [p for p in ("wrk", "nginx") if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench needs {' '.join(missing)}: apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    if not GUNICORN.exists():
        sys.exit("bench needs rproxy in .venv: python3 scripts/dev.py test (or pip install -e . there)")


def cpus(which: str) -> list[str]:
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", "0" if which == "load" else "1"]


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


class Service:
    def __init__(self, args, log: Path, env=None):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def nginx(tmp: Path, name: str, workers: int, server_block: str, pin: str) -> Service:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
daemon off;
worker_processes {workers};
worker_rlimit_nofile 40000;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    keepalive_requests 1000000;
    {server_block}
}}
""")
    return Service([*cpus(pin), nginx_bin(), "-c", str(conf), "-p", str(tmp)], tmp / f"{name}.out")


def start_upstream(tmp: Path, port: int) -> Service:
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    for name, size in BODIES.items():
        (www / name).write_bytes(b"x" * size)
    # /nostore/ serves the same files, marked uncacheable.
    block = (f"server {{ listen 127.0.0.1:{port}; root {www}; "
             f"location /nostore/ {{ alias {www}/; add_header Cache-Control no-store; }} }}")
    service = nginx(tmp, "upstream", 1, block, "load")
    wait_port(port)
    return service


def start_nginx_proxy(tmp: Path, port: int, upstream: int, workers: int) -> Service:
    block = f"""
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        access_log {tmp}/nginx-access.log;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}"""
    service = nginx(tmp, f"proxy{workers}", workers, block, "proxy")
    wait_port(port)
    return service


# Every middleware on, none of them refusing anything in the benchmark.
ALL_MIDDLEWARE = """
[rate_limit]
limit = 10000000/second
[filter]
deny = /admin /.git *.php
[cache]
[security_headers]
"""


def start_rproxy(tmp: Path, port: int, upstream: int, workers: int, upgrade: str = "websocket",
                 extra: str = "", log_format: str = "combined", server_extra: str = "") -> Service:
    ini = tmp / f"rproxy{workers}-{port}.ini"
    ini.write_text(f"""
[server]
bind = 127.0.0.1:{port}
workers = {workers}
worker_connections = 12000
max_tunnels = 11000
{server_extra}
[log]
access_log = {tmp}/rproxy-access-{port}.log
format = {log_format}
level = warning
[upstream:app]
servers = 127.0.0.1:{upstream}
[route:default]
upstream = app
upgrade = {upgrade}
{extra}
""")
    env = dict(os.environ, RPROXY_CONFIG=str(ini))
    service = Service([*cpus("proxy"), str(GUNICORN), "-c", "gunicorn.conf.py", "--no-control-socket"],
                      tmp / f"rproxy{workers}.out", env=env)
    wait_port(port)
    return service


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, duration: float, connections: int) -> dict:
    out = subprocess.run([*cpus("load"), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "p50": lat.get("50"), "p99": lat.get("99"), "errors": errors.group(0) if errors else ""}


def serve_echo(port: int) -> None:
    """`--serve-echo PORT`: an upstream that switches any Upgrade request to
    a byte echo, until EOF."""
    from gevent import monkey
    monkey.patch_all()
    from gevent.server import StreamServer

    def handle(sock, _addr):
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
        rest = head.split(b"\r\n\r\n", 1)[1]
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n" + rest)
        while data := sock.recv(65536):
            sock.sendall(data)
    StreamServer(("127.0.0.1", port), handle, backlog=4096).serve_forever()


def open_tunnel(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"GET /tunnel HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"port {port} closed the tunnel handshake: {head[:80]!r}")
        head += data
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"port {port} did not switch: {head[:80]!r}")
    return sock


def tunnel_throughput(port: int, total: int = 256 << 20) -> float:
    """MB/s echoed through one tunnel: a writer thread sends, we read back."""
    import threading
    sock = open_tunnel(port)
    chunk = b"t" * (256 << 10)

    def write():
        for _ in range(total // len(chunk)):
            sock.sendall(chunk)
    started = time.perf_counter()
    writer = threading.Thread(target=write)
    writer.start()
    received = 0
    while received < total:
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("tunnel closed early")
        received += len(data)
    elapsed = time.perf_counter() - started
    writer.join()
    sock.close()
    return total / elapsed / 1e6


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_pid(master: int) -> int:
    kids = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    if len(kids) != 1:
        raise RuntimeError(f"expected one worker under {master}, found {kids}")
    return kids[0]


def idle_tunnel_kib(port: int, master: int, count: int) -> float:
    worker = worker_pid(master)
    for sock in [open_tunnel(port) for _ in range(50)]:  # warm up
        sock.close()
    time.sleep(1)
    before = rss_kib(worker)
    tunnels = [open_tunnel(port) for _ in range(count)]
    time.sleep(2)
    after = rss_kib(worker)
    for sock in tunnels:
        sock.close()
    return (after - before) / count


def run_tunnels(tmp: Path, args) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    echo_port, ng_port, rp_port = free_port(), free_port(), free_port()
    echo = Service([*cpus("load"), sys.executable, __file__, "--serve-echo", str(echo_port)], tmp / "echo.out")
    wait_port(echo_port)
    block = f"""
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{ng_port};
        location / {{
            proxy_pass http://127.0.0.1:{echo_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
        }}
    }}"""
    services = [echo, nginx(tmp, "tunnel-nginx", 1, block, "proxy"),
                start_rproxy(tmp, rp_port, echo_port, 1, upgrade="websocket echo")]
    try:
        wait_port(ng_port)
        targets = {"direct": echo_port, "nginx": ng_port, "rproxy": rp_port}
        speeds: dict[str, list[float]] = {t: [] for t in targets}
        for _ in range(args.rounds):
            for target, port in targets.items():
                speeds[target].append(tunnel_throughput(port))
        print("\ntunnel throughput, one tunnel echoing 256 MiB (MB/s, median)")
        for target, values in speeds.items():
            print(f"  {target:<8} {statistics.median(values):>8.0f}")
        rp, di = statistics.median(speeds["rproxy"]), statistics.median(speeds["direct"])
        ng = statistics.median(speeds["nginx"])
        print(f"  ratios: rproxy/direct {rp / di:.2f}, rproxy/nginx {rp / ng:.2f}")
        print(f"\nworker memory per idle tunnel, {args.idle_tunnels} tunnels (KiB)")
        for target, service in (("nginx", services[1]), ("rproxy", services[2])):
            kib = idle_tunnel_kib(targets[target], service.proc.pid, args.idle_tunnels)
            print(f"  {target:<8} {kib:>8.1f}", flush=True)
    finally:
        for service in services:
            service.stop()


def start_nginx_cache(tmp: Path, port: int, upstream: int) -> Service:
    block = f"""
    proxy_cache_path {tmp}/nginx-cache keys_zone=bench:10m;
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_valid 200 10m;
            add_header X-Cache $upstream_cache_status;
        }}
    }}"""
    service = nginx(tmp, "nginx-cache", 1, block, "proxy")
    wait_port(port)
    return service


def run_observability(tmp: Path, args) -> None:
    """The cost of metrics (admin listener on) and JSON access logs."""
    up, plain, observed = free_port(), free_port(), free_port()
    services = [start_upstream(tmp, up)]
    try:
        services += [start_rproxy(tmp, plain, up, 1),
                     start_rproxy(tmp, observed, up, 1, extra=f"[admin]\nbind = 127.0.0.1:{free_port()}\n",
                                  log_format="json")]
        results = interleave({"off": f"http://127.0.0.1:{plain}/100B",
                              "on": f"http://127.0.0.1:{observed}/100B"}, args)
        print("\nmetrics and JSON access log, 1 worker, 100-byte responses (median req/s)")
        for target, runs in results.items():
            print(f"  {target:<4} {median(runs, 'rps'):>10.0f} {median(runs, 'p50'):>8.2f} {median(runs, 'p99'):>8.2f}")
        print(f"  ratio on/off {median(results['on'], 'rps') / median(results['off'], 'rps'):.2f}", flush=True)
    finally:
        for service in services:
            service.stop()


def run_middleware(tmp: Path, args) -> None:
    """Middleware cost: all four on versus none, on a response the cache may
    not store; and the cache-hit path versus nginx's proxy_cache hit."""
    up, plain, full, ngc = free_port(), free_port(), free_port(), free_port()
    services = [start_upstream(tmp, up)]
    try:
        services += [start_rproxy(tmp, plain, up, 1), start_rproxy(tmp, full, up, 1, extra=ALL_MIDDLEWARE),
                     start_nginx_cache(tmp, ngc, up)]
        targets = {"none": f"http://127.0.0.1:{plain}/nostore/100B",
                   "all four": f"http://127.0.0.1:{full}/nostore/100B",
                   "cache hit": f"http://127.0.0.1:{full}/100B",
                   "nginx hit": f"http://127.0.0.1:{ngc}/100B"}
        results = interleave(targets, args)
        print("\nmiddleware, 1 worker, 100-byte responses (median req/s)")
        for target, runs in results.items():
            print(f"  {target:<10} {median(runs, 'rps'):>10.0f} {median(runs, 'p50'):>8.2f} "
                  f"{median(runs, 'p99'):>8.2f}")
        rps = {t: median(r, "rps") for t, r in results.items()}
        print(f"  ratios: all four / none {rps['all four'] / rps['none']:.2f}, "
              f"rproxy cache hit / nginx cache hit {rps['cache hit'] / rps['nginx hit']:.2f}", flush=True)
    finally:
        for service in services:
            service.stop()


def interleave(targets: dict[str, str], args) -> dict[str, list[dict]]:
    """Warm every target up, then run wrk on each in turn, round after round,
    so that all of them see the same machine."""
    for url in targets.values():
        wrk(url, 1, args.connections)
    results: dict[str, list[dict]] = {t: [] for t in targets}
    for _ in range(args.rounds):
        for target, url in targets.items():
            results[target].append(wrk(url, args.duration, args.connections))
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", default="1,2", help="worker counts to try, comma separated")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP request benchmarks")
    parser.add_argument("--no-tunnels", action="store_true", help="skip the tunnel benchmarks")
    parser.add_argument("--no-middleware", action="store_true", help="skip the middleware benchmarks")
    parser.add_argument("--no-observability", action="store_true", help="skip the metrics/JSON-log benchmark")
    parser.add_argument("--no-tls", action="store_true",
                        help="skip HTTPS (keep-alive, new handshakes) and HTTP/2 (h2load) beside nginx")
    parser.add_argument("--idle-tunnels", type=int, default=5000)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    ensure_tools()

    rows = []
    with tempfile.TemporaryDirectory(prefix="rproxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user
        if not args.no_tunnels:
            run_tunnels(tmp, args)
        if not args.no_middleware:
            run_middleware(tmp, args)
        if not args.no_observability:
            run_observability(tmp, args)
        if not args.no_tls:
            from bench_tls import run_tls
            run_tls(tmp, args)
        up_port = free_port()
        upstream = start_upstream(tmp, up_port)
        try:
            for workers in (int(w) for w in args.workers.split(",")) if not args.no_http else ():
                ng_port, rp_port = free_port(), free_port()
                proxies = [start_nginx_proxy(tmp, ng_port, up_port, workers),
                           start_rproxy(tmp, rp_port, up_port, workers)]
                try:
                    for body in BODIES:
                        targets = {"direct": f"http://127.0.0.1:{up_port}/{body}",
                                   "nginx": f"http://127.0.0.1:{ng_port}/{body}",
                                   "rproxy": f"http://127.0.0.1:{rp_port}/{body}"}
                        results = interleave(targets, args)
                        rows.append((workers, body, results))
                        print_row(workers, body, results, flush=True)
                finally:
                    for p in proxies:
                        p.stop()
        finally:
            upstream.stop()
    if not rows:
        return 0
    print()
    print("summary: rproxy / nginx and rproxy / direct, req/s (medians over rounds)")
    for workers, body, results in rows:
        rp, ng, di = (median(results[t], "rps") for t in ("rproxy", "nginx", "direct"))
        print(f"  {workers}w {body:>5}: rproxy/nginx {rp / ng:.2f}   rproxy/direct {rp / di:.2f}")
    return 0


def print_row(workers: int, body: str, results: dict, flush: bool = False) -> None:
    print(f"\n{workers} worker(s), {body} responses")
    print(f"  {'target':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for target, runs in results.items():
        errors = "; ".join(r["errors"] for r in runs if r["errors"])
        print(f"  {target:<8} {median(runs, 'rps'):>10.0f} {median(runs, 'p50'):>8.2f} "
              f"{median(runs, 'p99'):>8.2f}  {errors}")
    rp, ng, di = (median(results[t], "rps") for t in ("rproxy", "nginx", "direct"))
    print(f"  ratios: rproxy/nginx {rp / ng:.2f}, rproxy/direct {rp / di:.2f}", flush=flush)


if __name__ == "__main__":
    sys.exit(main())
