"""Hostile and ordinary clients for the hardening tests and the benchmark,
each run as its own process so that it does not share a GIL with what it
measures:

    python tests/hostile.py slowloris PORT --count 500 --interval 1 --duration 10
    python tests/hostile.py slowbody  PORT --count 500 --interval 4 --duration 10
    python tests/hostile.py load      PORT --count 8 --duration 5 [--path /echo ...]

An attack keeps `count` connections open, sending one byte of a request
head (slowloris) or of a declared body (slowbody) every `interval` seconds,
and opens a new connection for each one the proxy cuts. `load` runs `count`
keep-alive clients in threads. Each prints one JSON line of what happened.
"""

from __future__ import annotations

import argparse
import http.client
import json
import selectors
import socket
import statistics
import sys
import threading
import time
from collections import deque

HEAD = b"GET /echo HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n" + b"X-Pad: 0123456789\r\n" * 50
BODY_HEAD = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"


class Attacker:
    def __init__(self, port: int, kind: str, interval: float):
        self.port = port
        self.kind = kind
        self.interval = interval
        self.selector = selectors.DefaultSelector()
        self.conns: dict[socket.socket, dict] = {}
        self.lifetimes: list[float] = []
        self.answers: dict[str, int] = {}
        self.opened = 0
        self.refused = 0

    def open(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            self.refused += 1
            return
        s.setblocking(False)
        now = time.monotonic()
        first = BODY_HEAD if self.kind == "slowbody" else HEAD[:1]
        self.conns[s] = {"opened": now, "next": now, "sent": 0, "first": first, "reply": b""}
        self.selector.register(s, selectors.EVENT_READ)
        self.opened += 1

    def drip(self, s: socket.socket, state: dict, now: float) -> None:
        try:
            if state["first"] is not None:
                s.send(state["first"])
                state["first"] = None
            elif self.kind == "slowloris":
                state["sent"] += 1
                s.send(HEAD[state["sent"]:state["sent"] + 1])
            else:
                s.send(b"x")
        except BlockingIOError:
            pass
        except OSError:
            self.closed(s, now)
            return
        state["next"] = now + self.interval

    def closed(self, s: socket.socket, now: float) -> None:
        state = self.conns.pop(s)
        self.selector.unregister(s)
        s.close()
        self.lifetimes.append(now - state["opened"])
        status = state["reply"][9:12].decode("latin-1") or "none"
        self.answers[status] = self.answers.get(status, 0) + 1

    def run(self, count: int, duration: float) -> dict:
        end = time.monotonic() + duration
        due: deque[socket.socket] = deque()  # in order of their next drip: all wait `interval`
        while time.monotonic() < end:
            while len(self.conns) < count:
                self.open()
                due.append(next(reversed(self.conns)))
            now = time.monotonic()
            while due and (due[0] not in self.conns or self.conns[due[0]]["next"] <= now):
                s = due.popleft()
                if s in self.conns:
                    self.drip(s, self.conns[s], now)
                    if s in self.conns:
                        due.append(s)
            wait = self.conns[due[0]]["next"] - now if due else 0.05
            for key, _ in self.selector.select(timeout=min(max(wait, 0.001), 0.05)):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    self.conns[s]["reply"] += data
                else:
                    self.closed(s, time.monotonic())
        still_open = len(self.conns)
        for s in list(self.conns):
            s.close()
        lifetimes = sorted(self.lifetimes)
        return {"kind": self.kind, "opened": self.opened, "cut": len(lifetimes), "still_open": still_open,
                "answers": self.answers,
                "lifetime_p50": round(statistics.median(lifetimes), 3) if lifetimes else None,
                "lifetime_max": round(lifetimes[-1], 3) if lifetimes else None}


PATTERN = bytes(range(256)) * 256  # what tests/upstream.py's /bytes and /abort send


def expected_body(path: str) -> bytes | None:
    """The body a /bytes?n=N answer must carry, byte for byte."""
    if not path.startswith("/bytes?n="):
        return None
    n = int(path.split("=", 1)[1].split("&", 1)[0])
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def load(port: int, count: int, duration: float, paths: list[str]) -> dict:
    """`count` keep-alive clients cycling through `paths`. Every outcome is
    counted: 200 with the right body, another status, a cut connection, a
    wrong body (must never happen) or no answer within 15 s (a hang)."""
    results = {"ok": 0, "failed": 0, "statuses": {}, "cut": 0, "wrong": 0, "hung": 0, "latencies": []}
    lock = threading.Lock()
    end = time.monotonic() + duration
    expected = {path: expected_body(path) for path in paths}

    def client(offset: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        mine = {"ok": 0, "failed": 0, "statuses": {}, "cut": 0, "wrong": 0, "hung": 0, "latencies": []}
        i = offset
        while time.monotonic() < end:
            path = paths[i % len(paths)]
            i += 1
            started = time.monotonic()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                status = str(response.status)
                mine["statuses"][status] = mine["statuses"].get(status, 0) + 1
                if response.status == 200 and (expected[path] is None or body == expected[path]):
                    mine["ok"] += 1
                elif response.status == 200:
                    mine["wrong"] += 1
                else:
                    mine["failed"] += 1
                if response.will_close:
                    conn.close()
            except TimeoutError:
                mine["hung"] += 1
                conn.close()
            except (OSError, http.client.HTTPException):
                mine["cut"] += 1  # a cut connection: the client knows the answer is incomplete
                conn.close()
            mine["latencies"].append(time.monotonic() - started)
        conn.close()
        with lock:
            for key in ("ok", "failed", "cut", "wrong", "hung"):
                results[key] += mine[key]
            for status, n in mine["statuses"].items():
                results["statuses"][status] = results["statuses"].get(status, 0) + n
            results["latencies"].extend(mine["latencies"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = sorted(results.pop("latencies"))
    results["rate"] = round(results["ok"] / duration, 1)
    results["p99_ms"] = round(latencies[int(len(latencies) * 0.99)] * 1000, 1) if latencies else None
    results["max_ms"] = round(latencies[-1] * 1000, 1) if latencies else None
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["slowloris", "slowbody", "load"])
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--path", action="append", help="load: paths to cycle through (default /echo)")
    args = parser.parse_args(argv)
    if args.kind == "load":
        result = load(args.port, args.count, args.duration, args.path or ["/echo"])
    else:
        result = Attacker(args.port, args.kind, args.interval).run(args.count, args.duration)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
