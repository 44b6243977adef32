"""WebSocket upstreams for the tunnel tests, run as their own process:

    python tests/ws_upstream.py --port P --raw-port R [--certfile C --keyfile K]

On P, gevent-websocket's server: /echo echoes every message (and answers
"!headers" with the handshake headers as JSON, "!protocol" with the agreed
subprotocol); /reject/NNN answers NNN without switching. On R, a raw TCP
server that speaks just enough HTTP to test the edges: /first-frame sends a
text frame in the same packet as its 101; an `Upgrade: tcp-echo` request gets
101 and then its bytes echoed until EOF, followed by "bye" and a close.
"""

import argparse
import base64
import hashlib
import json
import socket

from gevent import monkey

monkey.patch_all()

from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.server import StreamServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class App:
    def app_protocol(self, path):
        return "chat.v2"

    def __call__(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        path = environ["PATH_INFO"]
        if ws is None:
            code = int(path.rsplit("/", 1)[1]) if path.startswith("/reject/") else 404
            body = json.dumps({"rejected": code}).encode()
            start_response(f"{code} Rejected", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))])
            return [body]
        headers = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
        while True:
            message = ws.receive()
            if message is None:
                break
            if message == "!headers":
                ws.send(json.dumps(headers))
            elif message == "!protocol":
                ws.send(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", ""))
            else:
                ws.send(message, binary=isinstance(message, (bytes, bytearray)))
        return []


class RejectingHandler(WebSocketHandler):
    def run_application(self):
        if self.environ["PATH_INFO"].startswith("/reject/"):
            # Answer without switching, whatever the client asked.
            return super(WebSocketHandler, self).run_application()
        return super().run_application()


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def raw_handler(sock, address):
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            sock.close()
            return
        head += data
    head, _, rest = head.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(b":") for l in lines[1:])}
    upgrade = fields.get(b"upgrade", b"").lower()
    if upgrade == b"websocket":
        accept = accept_key(fields[b"sec-websocket-key"])
        frame = b"\x81\x05hello"
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frame)
        while sock.recv(4096):
            pass
    elif upgrade == b"tcp-echo":
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: tcp-echo\r\nConnection: Upgrade\r\n\r\n")
        if rest:
            sock.sendall(rest)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            sock.sendall(data)
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
    sock.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--raw-port", type=int, required=True)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args()
    tls = {"certfile": args.certfile, "keyfile": args.keyfile} if args.certfile else {}
    ws = WSGIServer(("127.0.0.1", args.port), App(), handler_class=RejectingHandler, log=None,
                    error_log=None, **tls)
    raw = StreamServer(("127.0.0.1", args.raw_port), raw_handler)
    raw.start()
    print(f"ws upstream on {args.port}, raw on {args.raw_port}", flush=True)
    ws.serve_forever()


if __name__ == "__main__":
    main()
