"""The HTTPS part of scripts/bench.py: rproxy beside nginx, both terminating
TLS with the same certificate (ECDSA P-256, made here with openssl) in front
of the same upstream, one worker each, interleaved round by round.

- keep-alive throughput: wrk over HTTPS (HTTP/1.1), 100-byte responses;
- new-handshake rate: wrk with `Connection: close`, so every request is a
  new TCP connection and a full TLS handshake (wrk resumes no sessions);
- HTTP/2 throughput: h2load (Debian's nghttp2-client, installed when
  missing and run as root), several connections with many streams each,
  and each one's HTTP/2 rate over its own HTTP/1.1 rate.

`--compare REF` adds rproxy as of a git ref to every measurement.

Prints medians and the ratios rproxy/nginx.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import bench_common as bench


def make_certificate(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "bench-cert.pem", tmp / "bench-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return str(cert), str(key)


def h2load_bin() -> str | None:
    if shutil.which("h2load") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nghttp2-client"],
                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return shutil.which("h2load")


def start_nginx_tls(tmp: Path, port: int, upstream: int, cert: str, key: str) -> bench.Service:
    block = f"""
    upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;{bench.NGINX_PROXY_LOCATION}
    }}"""
    service = bench.nginx(tmp, "nginx-tls", 1, block, "proxy")
    bench.wait_port(port)
    return service


def wrk_closing(url: str, duration: float, connections: int) -> dict:
    """New connection (and TLS handshake) per request."""
    out = subprocess.run([*bench.cpus("load"), "wrk", "-t1", f"-c{connections}",
                          f"-d{max(1, round(duration))}s", "-H", "Connection: close", url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "errors": errors.group(0) if errors else ""}


def h2load(binary: str, url: str, duration: float, clients: int, streams: int) -> dict:
    out = subprocess.run([*bench.cpus("load"), binary, "-c", str(clients), "-m", str(streams),
                          "-D", str(max(1, round(duration))), "--warm-up-time", "1", url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    failed = re.search(r"requests: .* (\d+) failed, (\d+) errored", out)
    if found is None:
        raise RuntimeError(f"h2load printed no rate:\n{out[-2000:]}")
    protocol = re.search(r"Application protocol: (\S+)", out)
    errors = f"{failed.group(1)} failed, {failed.group(2)} errored" if failed and failed.group(1) != "0" else ""
    return {"rps": float(found.group(1)), "protocol": protocol.group(1) if protocol else "?", "errors": errors}


def run_tls(tmp: Path, args) -> None:
    cert, key = make_certificate(tmp)
    up, ng, rp = bench.free_port(), bench.free_port(), bench.free_port()
    services = [bench.start_upstream(tmp, up)]
    tls_extra = f"certfile = {cert}\nkeyfile = {key}\nhttp2 = yes\n"
    try:
        services += [start_nginx_tls(tmp, ng, up, cert, key),
                     bench.start_rproxy(tmp, rp, up, 1, server_extra=tls_extra)]
        urls = {"nginx": f"https://127.0.0.1:{ng}/100B", "rproxy": f"https://127.0.0.1:{rp}/100B"}
        for name, ref, gunicorn_args in bench.compared(args):  # --compare: rproxy as of REF beside
            port = bench.free_port()
            services.append(bench.start_rproxy(tmp, port, up, 1, server_extra=tls_extra,
                                               tree=bench.source_tree(tmp, ref), gunicorn_args=gunicorn_args))
            urls[name] = f"https://127.0.0.1:{port}/100B"
        keepalive = bench.interleave(urls, args)
        print("\nHTTPS keep-alive, 1 worker, 100-byte responses (median req/s, p50/p99 ms)")
        for target, runs in keepalive.items():
            errors = "; ".join(r["errors"] for r in runs if r["errors"])
            print(f"  {target:<8} {bench.median(runs, 'rps'):>10.0f} {bench.median(runs, 'p50'):>8.2f} "
                  f"{bench.median(runs, 'p99'):>8.2f}  {errors}")
        ratio = bench.median(keepalive["rproxy"], "rps") / bench.median(keepalive["nginx"], "rps")
        print(f"  ratio rproxy/nginx {ratio:.2f}", flush=True)

        handshakes = rounds(urls, args, lambda url: wrk_closing(url, args.duration, args.connections))
        print("\nnew TLS handshakes, one request per connection (median connections/s)")
        report(handshakes)

        binary = h2load_bin()
        if binary is None:
            print("\nHTTP/2: h2load not found (apt-get install nghttp2-client), skipped", flush=True)
            return
        h2 = rounds(urls, args, lambda url: h2load(binary, url, args.duration, 10, 10))
        print("\nHTTP/2, h2load: 10 connections x 10 streams, 100-byte responses (median req/s)")
        report(h2, extra=lambda runs: runs[0]["protocol"])
        print("\nHTTP/2 over HTTP/1.1 on the same listener (h2load median / wrk keep-alive median)")
        for target in urls:
            ratio = statistics.median(r["rps"] for r in h2[target]) / bench.median(keepalive[target], "rps")
            print(f"  {target:<8} {ratio:.2f}", flush=True)
    finally:
        for service in services:
            service.stop()


def rounds(urls: dict[str, str], args, measure) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {t: [] for t in urls}
    for _ in range(args.rounds):
        for target, url in urls.items():
            results[target].append(measure(url))
    return results


def report(results: dict[str, list[dict]], extra=lambda runs: "") -> None:
    for target, runs in results.items():
        errors = "; ".join(r["errors"] for r in runs if r["errors"])
        print(f"  {target:<8} {statistics.median(r['rps'] for r in runs):>10.0f}  {extra(runs)} {errors}")
    rp, ng = (statistics.median(r["rps"] for r in results[t]) for t in ("rproxy", "nginx"))
    print(f"  ratio rproxy/nginx {rp / ng:.2f}", flush=True)
