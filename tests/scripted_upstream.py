"""An upstream that answers every connection with exactly the bytes it is
given, then closes (or holds the connection open), and records every byte
it received: for framings no well-behaved server would send, and for
checking that nothing at all reached the upstream."""

from __future__ import annotations

import socket
import threading
from typing import Callable


class ScriptedUpstream:
    """Listens on a free loopback port. Each connection: read the request
    head, send `answer` (or what `answer(head)` returns), then close (or,
    with `hold`, keep the connection open until stop()). Everything
    received, per connection, is kept in `received`."""

    def __init__(self, answer: bytes | Callable[[bytes], bytes] = b"", hold: bool = False):
        self.answer = answer
        self.hold = hold
        self.received: list[bytes] = []
        self._held: list[socket.socket] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._exchange, args=(conn,), daemon=True).start()

    def _exchange(self, conn: socket.socket) -> None:
        index = len(self.received)
        self.received.append(b"")
        conn.settimeout(5)
        try:
            while b"\r\n\r\n" not in self.received[index]:
                data = conn.recv(65536)
                if not data:
                    conn.close()
                    return
                self.received[index] += data
            conn.sendall(self.answer(self.received[index]) if callable(self.answer) else self.answer)
            if self.hold:
                self._held.append(conn)
                conn.settimeout(None)
                # Keep recording what arrives after the answer, until either side closes.
                while data := conn.recv(65536):
                    self.received[index] += data
        except OSError:
            pass
        if not self.hold:
            conn.close()

    @property
    def lines(self) -> list[bytes]:
        """The request line of each request received, byte for byte."""
        return [head.split(b"\r\n", 1)[0] for head in self.received if head]

    def stop(self) -> None:
        self._listener.close()
        for conn in self._held:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread's recv
            except OSError:
                pass
            conn.close()
