"""Request header names as the HTTP/1.x client spelled them, for `[server]
preserve_header_case` (hyper's option of that name): gunicorn upper-cases
every name as it parses a head, and the core names headers X-Api-Key.

The spellings are taken from what the parser already split, not from a
second parse: from gunicorn_h1c's result (its module, wrapped so that the
names of the head it parsed last stay at hand), or, with gunicorn's Python
parser, from the head's lines. They travel with the request as one more
field of gunicorn's request, SPELLINGS, which gunicorn puts into the WSGI
environ as messages.HEADER_CASE: {the core's name: the client's}. No client
can send that field (a name never holds a colon).

HTTP/2 has no case to keep: its names are lower-case on the wire (RFC 9113
8.2.1), and go upstream as the core names them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from gunicorn.config import Config
from gunicorn.http import message

from rproxy.messages import HEADER_CASE

# gunicorn's wsgi.create makes "HTTP_" + name (dashes as underscores) of it.
SPELLINGS = HEADER_CASE[len("HTTP_"):]


class _Recording:
    """gunicorn_h1c, keeping the (name, value) pairs of the head it parsed
    last, names as sent. Read right after the parse, in the same greenlet
    turn (nothing in between waits on I/O), so no other connection's parse
    comes in between."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module
        self.fields: list[tuple[bytes, bytes]] = []

    def __getattr__(self, name: str) -> Any:  # its exceptions, looked up when one is raised
        return getattr(self._module, name)

    def parse_request(self, data: bytes, **limits: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._module.parse_request(data, **limits)
        self.fields = result["headers"]
        return result


_recording: _Recording | None = None


def install(cfg: Config) -> None:
    """In a worker with preserve_header_case on, before it serves: the fast
    parser (when gunicorn uses it) keeps what it parsed last at hand."""
    global _recording
    if message._check_fast_parser(cfg):  # loads gunicorn's module global first
        module = message._fast_parser_module
        if not isinstance(module, _Recording):
            module = message._fast_parser_module = _Recording(module)
        _recording = module


# name as sent -> (the core's name, the name as sent), for the names clients
# send: working them out was most of what the option costs a request.
_known: dict[bytes, tuple[str, str]] = {}


def _learn(raw: bytes) -> tuple[str, str]:
    if len(_known) >= 2048:  # clients choose the names: bounded
        _known.clear()
    sent = raw.decode("latin-1")
    # The core's name, as messages.header_name makes it of the environ key.
    pair = _known[raw] = (sent.replace("_", "-").title(), sent)
    return pair


def spellings(names: list[bytes]) -> dict[str, str]:
    """{X-Api-Key: x-api-KEY} for the names (bytes) a client sent. The
    first spelling of a name sent twice wins."""
    known = _known
    # Reversed: of a name sent twice, the first spelling is put in last.
    return dict([known.get(raw) or _learn(raw) for raw in reversed(names)])


def fast_parsed() -> dict[str, str]:
    """The spellings of the head gunicorn_h1c parsed last."""
    recording = _recording
    assert recording is not None  # read only where install() put it in place
    fields, recording.fields = recording.fields, []
    known = _known
    return dict([known.get(name) or _learn(name) for name, _ in reversed(fields)])


def head_parsed(head: bytes) -> dict[str, str]:
    """The spellings of a head's field lines (gunicorn's Python parser,
    which checked them already); continuation lines carry no name."""
    return spellings([line.split(b":", 1)[0].rstrip(b" \t") for line in head.split(b"\r\n")
                      if line[:1] not in (b" ", b"\t")])
