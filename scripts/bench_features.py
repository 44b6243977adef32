"""Feature costs for scripts/bench.py, each beside nginx or beside rproxy
with the feature off, interleaved:

- tunnels: throughput of one upgrade tunnel echoing 256 MiB (direct, nginx
  as a WebSocket proxy, rproxy), and worker memory per idle tunnel;
- middleware: rate limit, filter, cache and security headers all on versus
  none (on a response the cache may not store), and rproxy's cache hit
  versus nginx's proxy_cache hit;
- observability: metrics (admin listener on) and JSON access lines.
"""

from __future__ import annotations

import socket
import statistics
import time
from pathlib import Path

from bench_common import (
    Service,
    free_port,
    interleave,
    median,
    nginx,
    raise_fd_limit,
    rss_kib,
    start_bench_upstream,
    start_rproxy,
    start_upstream,
    switch_protocols,
    wait_port,
    worker_pid,
)

# Every middleware on, none of them refusing anything in the benchmark.
ALL_MIDDLEWARE = """
[rate_limit]
limit = 10000000/second
[filter]
deny = /admin /.git *.php
[cache]
[security_headers]
"""


def open_tunnel(port: int) -> socket.socket:
    sock, _ = switch_protocols(port, b"GET /tunnel HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\n"
                                     b"Upgrade: echo\r\n\r\n", timeout=30)
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
    raise_fd_limit()
    echo_port, ng_port, rp_port = free_port(), free_port(), free_port()
    echo = start_bench_upstream(tmp, echo_port)
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
