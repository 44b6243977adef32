"""The soak test's clients (scripts/bench.py --soak), in their own process
so that they share no GIL with what they measure:

    python scripts/bench_load.py PORT --duration 600

A steady mix, paced rather than flat out, each answer checked:
- small: keep-alive GETs of /100B (100 bytes);
- large: keep-alive GETs of /1MiB;
- streaming: GET /stream?n=20&ms=50, a chunked response over about a second;
- WebSocket: an upgrade to the echo upstream, 50 messages of 1 KiB echoed,
  then closed.
Prints one JSON line: per kind, how many succeeded and failed, and the
first few failures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time

from bench_common import switch_protocols

PLAN = {  # kind: (threads, pause between requests in seconds)
    "small": (4, 0.004),
    "large": (1, 0.05),
    "streaming": (4, 0.0),
    "websocket": (2, 0.1),
}
STREAM_BODY = len(b"data: first\n\n") + 20 * 1024


def small(conn: http.client.HTTPConnection) -> None:
    expect(conn, "/100B", 100)


def large(conn: http.client.HTTPConnection) -> None:
    expect(conn, "/1MiB", 1 << 20)


def streaming(conn: http.client.HTTPConnection) -> None:
    expect(conn, "/stream?n=20&ms=50", STREAM_BODY)


def expect(conn: http.client.HTTPConnection, path: str, length: int) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200 or len(body) != length:
        raise AssertionError(f"{path}: {response.status}, {len(body)} bytes")


def websocket(port: int) -> None:
    sock, echoed = switch_protocols(
        port, b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
              b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + os.urandom(16).hex()[:22].encode()
              + b"==\r\n\r\n", timeout=15)
    try:
        message = os.urandom(1024)
        for _ in range(50):
            sock.sendall(message)
            while len(echoed) < len(message):
                data = sock.recv(65536)
                if not data:
                    raise AssertionError("tunnel closed mid-echo")
                echoed += data
            if echoed[:len(message)] != message:
                raise AssertionError("echo differs")
            echoed = echoed[len(message):]
    finally:
        sock.close()


def run(port: int, duration: float) -> dict:
    end = time.monotonic() + duration
    results = {kind: {"ok": 0, "failed": 0} for kind in PLAN}
    failures: list[str] = []
    lock = threading.Lock()

    def client(kind: str, pause: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        while time.monotonic() < end:
            try:
                if kind == "websocket":
                    websocket(port)
                else:
                    globals()[kind](conn)
                outcome = "ok"
            except Exception as e:  # every failure counts, whatever it is
                outcome = "failed"
                conn.close()
                with lock:
                    if len(failures) < 10:
                        failures.append(f"{kind}: {type(e).__name__}: {e}")
            with lock:
                results[kind][outcome] += 1
            if pause:
                time.sleep(pause)
        conn.close()

    threads = [threading.Thread(target=client, args=(kind, pause))
               for kind, (count, pause) in PLAN.items() for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 60)
    return {"results": results, "failures": failures}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--duration", type=float, default=60)
    args = parser.parse_args()
    print(json.dumps(run(args.port, args.duration)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
