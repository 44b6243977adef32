"""What the proxy learned about one request, in one typed record.

The application creates a RequestRecord when a request enters it and keeps it
in the WSGI environ under KEY; routing, the middleware and the forwarder fill
it in, and the access log, the metrics and Server-Timing read it once the
answer is out. Times are floats in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEY = "rproxy.record"


@dataclass(slots=True)
class RequestRecord:
    client: str | None = None        # the real client's address, once forwarded headers are read
    request_id: str | None = None
    route: str | None = None         # the matched route's name
    upstream: str | None = None      # the upstream's name ([upstream:NAME])
    server: str | None = None        # the upstream server that answered, host:port
    upstream_ms: float | None = None  # from sending upstream to its response head
    cache: str | None = None         # the cache's verdict: HIT, MISS, STALE, BYPASS...
    cache_ms: float | None = None    # time spent looking the request up in the cache
    error: str | None = None         # why the proxy answered (or cut) instead of the upstream
    in_flight: bool = False          # counted in the in-flight gauge, not yet taken off it
    taken_over: bool = False         # the connection went to a tunnel


# What readers see for a request the application never recorded (the admin
# listener's): nobody writes to it.
NOTHING = RequestRecord()


def of(environ: dict[str, Any]) -> RequestRecord:
    """The record of the request `environ` carries, attached on first use."""
    record: RequestRecord | None = environ.get(KEY)
    if record is None:
        record = environ[KEY] = RequestRecord()
    return record
