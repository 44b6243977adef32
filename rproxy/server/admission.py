"""Who gets a connection's worth of the worker: how many connections (or
requests) each client address holds, against `[server]
max_connections_per_ip`, and the short answer to one turned away before
the app sees it (429 with Retry-After, then closed).
"""

from __future__ import annotations

import socket


class AddressCounts:
    """How many connections (or requests) each client address holds."""

    __slots__ = ("limit", "counts")

    def __init__(self, limit: int):
        self.limit = limit
        self.counts: dict[str, int] = {}

    def enter(self, address: str) -> bool:
        held = self.counts.get(address, 0)
        if held >= self.limit:
            return False
        self.counts[address] = held + 1
        return True

    def leave(self, address: str) -> None:
        held = self.counts.pop(address, 1) - 1
        if held > 0:
            self.counts[address] = held


def refuse(sock: socket.socket, status: str, message: str, retry_after: int | None = None) -> None:
    """Answer on a connection the app never sees, without waiting on the client."""
    body = f"{message}\n".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    try:
        sock.settimeout(1.0)
        sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
    except OSError:
        pass
