"""The benchmark's own upstream, for what a static nginx cannot do:

    python scripts/bench_upstream.py PORT

- any request with `Upgrade:` (websocket, echo): 101, then a byte echo until EOF;
- `GET /hold?s=N`: a chunked response whose first chunk goes at once and
  whose end comes after N seconds (default 300): a held stream, as an event
  stream or long poll is;
- `GET /stream?n=N&ms=M`: N chunks of 1 KiB, M ms apart;
- anything else: 100 bytes.

Keep-alive, HTTP/1.1 only, on gevent: thousands of held connections cost it
little.
"""

from __future__ import annotations

import sys
from urllib.parse import parse_qs

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

SMALL = b"x" * 100


def read_head(sock, buffered: bytes) -> tuple[bytes, bytes] | None:
    while b"\r\n\r\n" not in buffered:
        data = sock.recv(65536)
        if not data:
            return None
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def handle(sock, _addr) -> None:
    buffered = b""
    try:
        while True:
            got = read_head(sock, buffered)
            if got is None:
                return
            head, buffered = got
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
            length = int(headers.get("content-length", "0") or 0)
            while len(buffered) < length:
                data = sock.recv(65536)
                if not data:
                    return
                buffered += data
            buffered = buffered[length:]
            path, _, query = target.partition("?")
            params = {k: v[0] for k, v in parse_qs(query).items()}
            if "upgrade" in headers:
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Upgrade: " + headers["upgrade"].encode() + b"\r\n\r\n" + buffered)
                while data := sock.recv(65536):
                    sock.sendall(data)
                return
            if path in ("/hold", "/stream"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"data: first\n\n"))
                if path == "/hold":
                    gevent.sleep(float(params.get("s", 300)))
                else:
                    piece = chunk(b"y" * 1024)
                    for _ in range(int(params.get("n", 10))):
                        gevent.sleep(float(params.get("ms", 10)) / 1000)
                        sock.sendall(piece)
                sock.sendall(b"0\r\n\r\n")
                continue
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + SMALL)
    except OSError:
        return


def main() -> int:
    port = int(sys.argv[1])
    StreamServer(("127.0.0.1", port), handle, backlog=4096).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
