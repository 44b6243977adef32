"""103 Early Hints from an upstream, passed on to the client.

An upstream's interim answers are read and skipped by the exchange
(exchange.py); a 103 carries hints (Link: preload) worth having before the
final answer, so it goes on through gunicorn's `wsgi.early_hints`, which
sends it only to HTTP/1.1 and HTTP/2 clients and never once the final
answer has started. Other 1xx (102 Processing) stay the upstream's
business, and no interim answer is ever stored by the cache: it never
reaches the response the cache sees.
"""

from __future__ import annotations

import logging
from typing import Any

from rproxy.forwarding.exchange import Headers
from rproxy.messages import clean_response_headers

log = logging.getLogger("rproxy.forward")
EARLY_HINTS = 103


def relay(environ: dict[str, Any], status: int, headers: Headers) -> None:
    """Pass the interim answer `status` with `headers` (exchange.Headers) on
    to the client of `environ`, when it is a 103 with hints."""
    send = environ.get("wsgi.early_hints")
    if status != EARLY_HINTS or send is None:
        return
    # Hop-by-hop and malformed headers are the upstream's, as on final answers.
    hints = clean_response_headers(headers, headers.get("Connection"), False)
    if not hints:
        return
    try:
        send(hints)
    except OSError as e:  # the client left: the final answer's write finds out and says so
        log.debug("103 Early Hints not sent: %s", e)
