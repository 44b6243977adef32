"""What every part of scripts/bench.py shares: ports, pinning, the services
it starts (and only those it stops), nginx and rproxy set-ups, wrk, and the
worker's memory and descriptors.

Every process the benchmark starts is a Service in its own session (process
group): stopping one signals that group alone, never a process by name, so
other gunicorns and nginxes on the machine are left alone. `stop_all()` runs
at exit for any service a section left behind.
"""

from __future__ import annotations

import atexit
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = ROOT / ".venv" / "bin" / "gunicorn"
PYTHON = ROOT / ".venv" / "bin" / "python"
BODIES = {"100B": 100, "1MiB": 1 << 20}
SCRIPTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening")


def switch_protocols(port: int, request: bytes, timeout: float) -> tuple[socket.socket, bytes]:
    """Send an Upgrade request on a new connection and read the answer's
    head: the socket and what came after the head. ConnectionError unless
    the answer is 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                raise ConnectionError(f"port {port} closed the upgrade handshake: {head[:80]!r}")
            head += data
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"port {port} did not switch protocols: {head[:80]!r}")
    except BaseException:
        sock.close()
        raise
    return sock, head.split(b"\r\n\r\n", 1)[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpus(which: str) -> list[str]:
    """Load generator and upstreams on CPU 0, the proxy under test on CPU 1."""
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", "0" if which == "load" else "1"]


def nginx_bin() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


_RUNNING: list["Service"] = []


class Service:
    """A process the benchmark started, in a session of its own."""

    def __init__(self, args, log: Path, env=None, cwd=None):
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=cwd or ROOT, start_new_session=True)
        _RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with _suppress_gone():
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with _suppress_gone():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self in _RUNNING:
            _RUNNING.remove(self)
        self.log.close()


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is ProcessLookupError


@atexit.register
def stop_all() -> None:
    for service in list(reversed(_RUNNING)):
        service.stop()


class Stack:
    """Services started together, stopped together (in reverse)."""

    def __init__(self):
        self.services: list[Service] = []

    def add(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for service in reversed(self.services):
            service.stop()


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
    keepalive_timeout 600s;
    {server_block}
}}
""")
    return Service([*cpus(pin), nginx_bin(), "-c", str(conf), "-p", str(tmp)], tmp / f"{name}.out")


def start_upstream(tmp: Path, port: int) -> Service:
    """nginx serving static bodies of 100 bytes and 1 MiB."""
    www = tmp / "www"
    www.mkdir(exist_ok=True)
    for name, size in BODIES.items():
        (www / name).write_bytes(b"x" * size)
    # /nostore/ serves the same files, marked uncacheable.
    block = (f"server {{ listen 127.0.0.1:{port} backlog=4096; root {www}; "
             f"location /nostore/ {{ alias {www}/; add_header Cache-Control no-store; }} }}")
    service = nginx(tmp, f"upstream-{port}", 1, block, "load")
    wait_port(port)
    return service


def start_bench_upstream(tmp: Path, port: int) -> Service:
    """The gevent upstream of scripts/bench_upstream.py: held streams,
    timed streams and upgrade echo."""
    service = Service([*cpus("load"), str(PYTHON), str(SCRIPTS / "bench_upstream.py"), str(port)],
                      tmp / f"bench-upstream-{port}.out")
    wait_port(port)
    return service


# What nginx does per request as a reverse proxy here: what rproxy does (upstream
# keep-alive, the forwarding headers, a request id).
NGINX_PROXY_LOCATION = """
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $request_id;
        }"""


def start_nginx_proxy(tmp: Path, port: int, upstream: int, workers: int = 1) -> Service:
    block = f"""
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        access_log {tmp}/nginx-access-{port}.log;
{NGINX_PROXY_LOCATION}
    }}"""
    service = nginx(tmp, f"proxy-{port}", workers, block, "proxy")
    wait_port(port)
    return service


def source_tree(tmp: Path, ref: str) -> Path:
    """rproxy as of a git ref, unpacked beside the benchmark (for A/B runs:
    its gunicorn.conf.py puts its own directory first on sys.path)."""
    dest = tmp / f"src-{re.sub(r'[^A-Za-z0-9._-]', '_', ref)}"
    if not dest.exists():
        archive = tmp / "ref.tar"
        with open(archive, "wb") as out:
            subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, stdout=out)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        archive.unlink()
    return dest


def compared(args) -> list[tuple[str, str, str]]:
    """(target name, git ref, gunicorn flags) of each `--compare "REF [FLAGS]"`."""
    out = []
    for spec in args.compare or ():
        ref, _, flags = spec.partition(" ")
        out.append((f"rproxy@{ref}" + (f" {flags}" if flags else ""), ref, flags))
    return out


def start_rproxy(tmp: Path, port: int, upstream: int, workers: int = 1, upgrade: str = "websocket",
                 extra: str = "", log_format: str = "combined", server_extra: str = "",
                 upstream_extra: str = "", tree: Path | None = None, gunicorn_args: str = "") -> Service:
    """rproxy with its core features on (routing, forwarding headers,
    request id, access log) and the given extras; `tree` runs another
    checkout's code (see source_tree)."""
    ini = tmp / f"rproxy-{port}.ini"
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
{upstream_extra}
[route:default]
upstream = app
upgrade = {upgrade}
{extra}
""")
    env = dict(os.environ, RPROXY_CONFIG=str(ini))
    if gunicorn_args:
        env["GUNICORN_CMD_ARGS"] = gunicorn_args
    tree = tree or ROOT
    service = Service([*cpus("proxy"), str(GUNICORN), "-c", str(tree / "gunicorn.conf.py"), "--no-control-socket",
                       "--backlog", "4096"], tmp / f"rproxy-{port}.out", env=env, cwd=tree)
    wait_port(port)
    return service


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, duration: float, connections: int, script: Path | None = None) -> dict:
    args = [*cpus("load"), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=duration + 60).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rps = float(found.group(1)) if found else 0.0
    lat = {p: float(v) * _UNITS[u] for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.findall(r"Non-2xx or 3xx responses: \d+|Socket errors: .*", out)
    return {"rps": rps, "p50": lat.get("50", float("nan")), "p99": lat.get("99", float("nan")),
            "errors": "; ".join(errors)}


def interleave(targets: dict[str, str], args, script: Path | None = None) -> dict[str, list[dict]]:
    """Warm every target up, then run wrk on each in turn, round after round,
    so that all of them see the same machine."""
    for url in targets.values():
        wrk(url, 1, args.connections, script)
    results: dict[str, list[dict]] = {t: [] for t in targets}
    for _ in range(args.rounds):
        for target, url in targets.items():
            results[target].append(wrk(url, args.duration, args.connections, script))
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def worker_pid(master: int, timeout: float = 10) -> int:
    """The one worker of a gunicorn or nginx master."""
    deadline = time.monotonic() + timeout
    while True:
        kids = children(master)
        if len(kids) == 1:
            return kids[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one worker under {master}, found {kids}")
        time.sleep(0.1)


def say(text: str) -> None:
    print(text, flush=True)
    sys.stdout.flush()
