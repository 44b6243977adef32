"""The upstream server the tests put behind rproxy, run as its own process:

    python tests/upstream.py --port N

A gevent pywsgi app whose endpoints behave well or badly on request, and
which records what it really received (request line, raw header pairs, body
digest) and how many TCP connections it accepted.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import socket
import ssl
import sys
import time
from email.utils import formatdate
from urllib.parse import parse_qs

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

STATS = {"connections": 0, "open": 0, "requests": 0, "sick": False}
COUNTS: dict[str, int] = {}
RELEASES: dict[str, Event] = {}
FAILS: dict[str, dict[str, str]] = {}  # /cacheable id -> {"status": ..., "delay": ...} from now on
PATTERN = bytes(range(256)) * 256  # 64 KiB


class Abort(Exception):
    """Raised after the endpoint wrecked its own connection on purpose."""


class RecordingHandler(WSGIHandler):
    def handle(self):
        STATS["connections"] += 1
        STATS["open"] += 1
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            super().handle()
        finally:
            STATS["open"] -= 1

    def get_environ(self):
        env = super().get_environ()
        env["upstream.socket"] = self.socket
        if isinstance(self.socket, ssl.SSLSocket):
            peer = self.socket.getpeercert()
            env["upstream.client_cert"] = dict(x[0] for x in peer["subject"]) if peer else None
            env["upstream.sni"] = getattr(self.socket, "rproxy_sni", None)
        env["upstream.request_line"] = self.requestline
        env["upstream.raw_headers"] = list(self.headers.items())
        return env


def _json(start_response, payload, status="200 OK", extra=()):
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), *extra])
    return [body]


def _read_body(environ):
    digest, total = hashlib.sha256(), 0
    stream = environ["wsgi.input"]
    while True:
        data = stream.read(256 * 1024)
        if not data:
            break
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


def pattern_bytes(n: int):
    while n > 0:
        piece = PATTERN[:min(n, len(PATTERN))]
        n -= len(piece)
        yield piece


def app(environ, start_response):
    STATS["requests"] += 1
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}

    if path == "/_stats":
        return _json(start_response, STATS)
    if path == "/_reset":
        STATS.update(connections=0, requests=0)
        return _json(start_response, STATS)
    if path == "/_sick":
        STATS["sick"] = query.get("on") == "1"
        return _json(start_response, STATS)
    if path == "/cacheable":
        return cacheable(environ, start_response, query)
    if path == "/_fail":
        # /cacheable?id=ID answers `status` and/or first sleeps `delay` from
        # now on; neither: as its query says again.
        ident = query.pop("id")
        FAILS.update({ident: query}) if query else FAILS.pop(ident, None)
        return _json(start_response, {"failing": FAILS})

    if path == "/healthz":
        if STATS["sick"]:
            return _json(start_response, {"healthy": False}, status="503 Service Unavailable")
        return _json(start_response, {"healthy": True})

    if path.startswith("/echo") or path == "/upload" or path.startswith("/app"):
        length, digest = _read_body(environ)
        return _json(start_response, {
            "port": environ["SERVER_PORT"],
            "method": environ["REQUEST_METHOD"],
            "request_line": environ["upstream.request_line"],
            "headers": environ["upstream.raw_headers"],
            "body_length": length,
            "body_sha256": digest,
            "tls_sni": environ.get("upstream.sni"),
            "tls_client_cert": environ.get("upstream.client_cert"),
        })

    if path == "/bytes":
        n = int(query.get("n", "100"))
        headers = [("Content-Type", "application/octet-stream")]
        if query.get("chunked") != "1":
            headers.append(("Content-Length", str(n)))
        start_response("200 OK", headers)
        return pattern_bytes(n)

    if path == "/sse":
        key = query.get("key", "default")
        release = RELEASES.setdefault(key, Event())

        def events():
            yield b"data: first\n\n"
            release.wait(timeout=20)
            yield b"data: second\n\n"
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return events()

    if path == "/ticks":
        # n events, `every` seconds apart, then the end: a stream that idles between events.
        n, every = int(query.get("n", "3")), float(query.get("every", "1"))

        def ticks():
            for i in range(n):
                if i:
                    gevent.sleep(every)
                yield b"data: tick %d\n\n" % i
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        return ticks()

    if path == "/release":
        RELEASES.setdefault(query.get("key", "default"), Event()).set()
        return _json(start_response, {"released": True})

    if path == "/slow":
        gevent.sleep(float(query.get("delay", "1")))
        return _json(start_response, {"slept": float(query.get("delay", "1"))})

    if path == "/abort":
        # Promise 2n bytes, send n, then drop the connection.
        n = int(query.get("n", "100000"))
        sock = environ["upstream.socket"]
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * n))
        for piece in pattern_bytes(n):
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        raise Abort  # pywsgi: stop this connection without writing anything

    if path == "/abort-chunked":
        n = int(query.get("n", "100000"))

        def cut():
            yield from pattern_bytes(n)
            environ["upstream.socket"].shutdown(socket.SHUT_RDWR)
            raise Abort
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return cut()

    if path == "/malformed":
        sock = environ["upstream.socket"]
        sock.sendall(b"HTTP/1.1 twohundred OK\r\nContent-Length: 2\r\n\r\nhi")
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        raise Abort

    if path == "/bad-header":
        sock = environ["upstream.socket"]
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Bad: a\x01b\r\nX-Good: fine\r\nContent-Length: 2\r\n\r\nok")
        sock.close()
        raise Abort

    if path == "/hangup":
        sock = environ["upstream.socket"]
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        raise Abort

    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        if code in (204, 304):
            start_response(f"{code} X", [("ETag", '"v1"')])
            return [b""]
        return _json(start_response, {"status": code}, status=f"{code} X")

    if path == "/head":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        if environ["REQUEST_METHOD"] == "HEAD" and not query.get("leaky"):
            return []
        return [b"hello"]  # with ?leaky=1, wrongly, also to HEAD

    if path == "/cookies":
        body = b"cookies"
        start_response("200 OK", [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly"),
                                  ("Set-Cookie", "c=3, with comma; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    if path == "/hop":
        body = b"hop"
        start_response("200 OK", [("Connection", "X-Secret, keep-alive"), ("X-Secret", "internal"),
                                  ("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "Basic"),
                                  ("Trailer", "X-Checksum"), ("Upgrade", "h2c"), ("X-Kept", "yes"),
                                  ("X-Frame-Options", "SAMEORIGIN"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    if path == "/gzip":
        raw = b"compress me " * 1000
        body = gzip.compress(raw, mtime=0)
        start_response("200 OK", [("Content-Encoding", "gzip"), ("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(body))),
                                  ("X-Body-Sha256", hashlib.sha256(body).hexdigest())])
        return [body]

    if path == "/early-reply":
        # Answers without reading the request body (as an upstream 413 would).
        return _json(start_response, {"early": True}, status="413 Payload Too Large")

    return _json(start_response, {"error": "no such endpoint", "request_line": environ["upstream.request_line"]},
                 status="404 Not Found")


def cacheable(environ, start_response, query):
    """Answers as the query says (cc, etag, lm, expires, age, vary, cookie,
    status, size (padded with spaces, or with pattern_bytes if pattern), delay, tags: Surrogate-Key, cachetag: Cache-Tag, date:
    a Date so many seconds ago); the
    body counts how often the upstream answered.
    An id set failing with /_fail sleeps first, and/or answers that error
    status instead, uncacheable."""
    key = environ["PATH_INFO"] + "?" + environ.get("QUERY_STRING", "")
    failing = FAILS.get(query.get("id", ""), {})
    if failing.get("delay"):
        gevent.sleep(float(failing["delay"]))
    if failing.get("status"):
        return _json(start_response, {"status": int(failing["status"])}, status=f"{failing['status']} X")
    if query.get("delay"):
        gevent.sleep(float(query["delay"]))
    headers = [("Content-Type", "application/json")]
    if query.get("cc"):
        headers.append(("Cache-Control", query["cc"]))
    etag = query.get("etag")
    if etag:
        headers.append(("ETag", f'"{etag}"'))
    if query.get("lm"):
        headers.append(("Last-Modified", formatdate(time.time() - float(query["lm"]), usegmt=True)))
    if query.get("expires"):
        headers.append(("Expires", formatdate(time.time() + float(query["expires"]), usegmt=True)))
    if query.get("age"):
        headers.append(("Age", query["age"]))
    if query.get("date"):
        headers.append(("Date", formatdate(time.time() - float(query["date"]), usegmt=True)))
    if query.get("sc"):
        headers.append(("Surrogate-Control", query["sc"]))
    if query.get("vary"):
        headers.append(("Vary", query["vary"]))
    if query.get("tags"):
        headers.append(("Surrogate-Key", query["tags"]))
    if query.get("cachetag"):
        headers.append(("Cache-Tag", query["cachetag"]))
    if query.get("cookie"):
        headers.append(("Set-Cookie", "session=1"))
    if etag and environ.get("HTTP_IF_NONE_MATCH") == f'"{etag}"':
        COUNTS["304:" + key] = COUNTS.get("304:" + key, 0) + 1
        start_response("304 Not Modified", headers[1:])
        return [b""]
    COUNTS[key] = COUNTS.get(key, 0) + 1
    body = json.dumps({"n": COUNTS[key], "revalidated": COUNTS.get("304:" + key, 0),
                       "accept": environ.get("HTTP_ACCEPT")}).encode()
    pad = max(0, int(query.get("size", 0)) - len(body))
    body += b"".join(pattern_bytes(pad)) if query.get("pattern") else b" " * pad
    headers.append(("Content-Length", str(len(body))))
    start_response(f"{query.get('status', '200')} X", headers)
    return [body]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", help="serve HTTPS with this certificate chain")
    parser.add_argument("--keyfile")
    parser.add_argument("--client-ca", help="require client certificates issued by this CA")
    args = parser.parse_args(argv)
    tls = {}
    if args.certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.certfile, args.keyfile)
        if args.client_ca:
            context.load_verify_locations(args.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        # Remember the name the client asked for (SNI), for the echo.
        context.sni_callback = lambda sock, name, _: setattr(sock, "rproxy_sni", name)
        tls["ssl_context"] = context
    server = WSGIServer(("127.0.0.1", args.port), app, handler_class=RecordingHandler,
                        log=None, error_log=None, **tls)
    print(f"upstream listening on {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    from gevent import monkey
    monkey.patch_all()
    sys.exit(main())
