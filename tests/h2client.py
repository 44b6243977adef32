"""A bare HTTP/2 client on the h2 library, for what httpx and curl will not
send: separate cookie fields, an extended CONNECT, a stream reset mid-upload."""

from __future__ import annotations

import socket
import ssl

import h2.config
import h2.connection
import h2.events


class RawH2:
    def __init__(self, port: int, ca_file: str | None = None):
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
        self.streams[stream_id] = {"status": None, "headers": [], "body": b"", "reset": None, "ended": False}
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(stream_id, data, end_stream=end)
        self.flush()

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, error_code=0x8)  # CANCEL
        self.flush()

    def response(self, stream_id: int) -> dict:
        """Read until the stream ends or is reset: status, headers, body, reset."""
        state = self.streams[stream_id]
        while not state["ended"] and state["reset"] is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            for event in self.conn.receive_data(data):
                s = self.streams.get(getattr(event, "stream_id", None))
                if s is None:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
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
