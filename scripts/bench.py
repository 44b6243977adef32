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
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
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
    service = nginx(tmp, "upstream", 1, f"server {{ listen 127.0.0.1:{port}; root {www}; }}", "load")
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


def start_rproxy(tmp: Path, port: int, upstream: int, workers: int) -> Service:
    ini = tmp / f"rproxy{workers}.ini"
    ini.write_text(f"""
[server]
bind = 127.0.0.1:{port}
workers = {workers}
worker_connections = 4096
[log]
access_log = {tmp}/rproxy-access.log
level = warning
[upstream:app]
servers = 127.0.0.1:{upstream}
[route:default]
upstream = app
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


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--workers", default="1,2", help="worker counts to try, comma separated")
    args = parser.parse_args()
    ensure_tools()

    rows = []
    with tempfile.TemporaryDirectory(prefix="rproxy-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user
        up_port = free_port()
        upstream = start_upstream(tmp, up_port)
        try:
            for workers in (int(w) for w in args.workers.split(",")):
                ng_port, rp_port = free_port(), free_port()
                proxies = [start_nginx_proxy(tmp, ng_port, up_port, workers),
                           start_rproxy(tmp, rp_port, up_port, workers)]
                try:
                    for body in BODIES:
                        targets = {"direct": f"http://127.0.0.1:{up_port}/{body}",
                                   "nginx": f"http://127.0.0.1:{ng_port}/{body}",
                                   "rproxy": f"http://127.0.0.1:{rp_port}/{body}"}
                        for url in targets.values():  # warm up pools and caches
                            wrk(url, 1, args.connections)
                        results: dict[str, list[dict]] = {t: [] for t in targets}
                        for _ in range(args.rounds):
                            for target, url in targets.items():
                                results[target].append(wrk(url, args.duration, args.connections))
                        rows.append((workers, body, results))
                        print_row(workers, body, results, flush=True)
                finally:
                    for p in proxies:
                        p.stop()
        finally:
            upstream.stop()
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
