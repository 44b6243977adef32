"""An upstream that records each request line byte for byte and answers
with it, so even a malformed line the proxy let through would show."""

from __future__ import annotations

import socket
import threading

import pytest


class RecordingUpstream:
    """A raw-socket upstream on a free loopback port, in a thread."""

    def __init__(self):
        self.lines: list[bytes] = []   # request lines
        self.heads: list[bytes] = []   # whole request heads
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket):
        conn.settimeout(10)
        with conn:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
            except OSError:
                return
            head = data.split(b"\r\n\r\n", 1)[0]
            line = head.split(b"\r\n", 1)[0]
            self.heads.append(head)
            self.lines.append(line)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                         % (len(line), line))

    def close(self):
        self.sock.close()


@pytest.fixture
def recorder():
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()
