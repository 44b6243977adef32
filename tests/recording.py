"""An upstream that answers each request with its request line, byte for
byte, so even a malformed line the proxy let through would show, and keeps
every line it received."""

from __future__ import annotations

import pytest
from scripted_upstream import ScriptedUpstream


def _request_line(head: bytes) -> bytes:
    line = head.split(b"\r\n", 1)[0]
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(line), line)


@pytest.fixture
def recorder():
    upstream = ScriptedUpstream(_request_line)
    yield upstream
    upstream.stop()
