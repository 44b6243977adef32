"""Revalidation of stored responses: a stored response refreshed by the 304
that revalidated it (RFC 9111 4.3.4), and the background revalidation of
stale-while-revalidate (RFC 5861), one greenlet per key and worker, which
stores what the upstream answers and never touches the client's response.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING

import gevent

from rproxy import record
from rproxy.httpcache.bodies import discard, drain, read_whole
from rproxy.httpcache.rules import Entry, storable, vary_keys
from rproxy.messages import Request, Response

if TYPE_CHECKING:
    from rproxy.middleware.cache import HTTPCache

log = logging.getLogger("rproxy.cache")

CONDITIONALS = ("If-None-Match", "If-Modified-Since")
# Never copied from a 304 onto the stored response (RFC 9111 3.2).
NOT_UPDATED = frozenset({"content-length", "content-encoding", "transfer-encoding", "content-range",
                         "etag", "content-md5"})


def refreshed(entry: Entry, response: Response, request_time: float, response_time: float) -> Entry:
    """The stored response, with the headers of a 304 that revalidated it."""
    updates = {k.lower(): (k, v) for k, v in response.headers if k.lower() not in NOT_UPDATED}
    headers = [(k, v) for k, v in entry.headers if k.lower() not in updates]
    headers += [pair for pair in updates.values() if pair[0].lower() not in ("x-cache", "cache-status")]
    return Entry(entry.status, entry.reason, headers, entry.body, request_time, response_time, entry.vary,
                 entry.targets)


def revalidate_later(cache: HTTPCache, request: Request, call_next, key: str, entry: Entry) -> None:
    """Revalidate `entry` in a background greenlet (stale-while-revalidate);
    `cache.revalidating` holds `key` while it runs."""
    plain = {k: v for k, v in request.headers.items() if k not in CONDITIONALS}
    background = copy.copy(request)
    background.method = "GET"  # a HEAD's stale answer is refreshed with the body too
    background.environ = dict(request.environ)
    # Its own record: what the background exchange learns must not land in
    # the log line or metrics of the request that was answered stale.
    background.record = background.environ[record.KEY] = record.RequestRecord(
        client=request.record.client, request_id=request.request_id)
    background.headers = {**plain, **dict(entry.validators())}
    cache.revalidating.add(key)
    gevent.spawn(_revalidate, cache, background, plain, call_next, key, entry)


def _revalidate(cache: HTTPCache, request: Request, plain: dict[str, str], call_next, key: str,
                entry: Entry) -> None:
    targets = cache.config.targeted_fields
    try:
        request_time = time.time()
        response = call_next(request)
        response_time = time.time()
        fresh: Entry | None = None
        if response.status == 304:
            drain(response)
            fresh = refreshed(entry, response, request_time, response_time)
        elif storable("GET", plain, response.status, response.headers, targets)[0]:
            body = read_whole(response, cache.config.max_entry_size)
            if body is not None:
                fresh = Entry(response.status, response.reason, list(response.headers), body,
                              request_time, response_time, vary_keys(response.headers, plain), targets)
        else:
            discard(response)
        found = cache.lookup(key, request)  # as stored now, not as when it went stale
        if found is None:
            return
        if fresh is not None:
            cache.save(key, [e for e in found[0] if e.vary != fresh.vary], fresh)
        elif response.status < 500:  # no longer cacheable: the stale entry goes too
            cache.save(key, [e for e in found[0] if e.vary != entry.vary], None)
        log.debug("cache: revalidated %s in the background: %s, request_id=%s",
                  request.target, response.status, request.request_id)
    except Exception:
        log.exception("cache: background revalidation of %s failed, request_id=%s",
                      request.target, request.request_id)
    finally:
        cache.revalidating.discard(key)
