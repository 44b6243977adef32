"""Prometheus metrics, counted by every worker and read as one.

prometheus_client's multiprocess mode: each worker writes its values to
files in a directory the master prepares ($PROMETHEUS_MULTIPROC_DIR, emptied
at start) and the admin listener adds them up. A dead worker's live gauges
are dropped by the master (gunicorn's child_exit hook). Counting happens at
the end of each request, from what the access log sees, so the hot path
pays a few label lookups at most. Certificate expiry is the exception:
worked out at each scrape, so that it counts down.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref

from rproxy.record import KEY as RECORD
from rproxy.record import NOTHING

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets, seconds: fine below 100 ms where a proxy lives.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_metrics = None
_looked = False


def prepare_directory(configured: str | None) -> str:
    """In the master, before any worker: an empty directory for the values."""
    path = configured or os.path.join(tempfile.gettempdir(), f"rproxy-metrics-{os.getpid()}")
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, mode=0o700)
    os.environ[ENV] = path
    return path


def worker_died(pid: int) -> None:
    """In the master, when a worker exits: its live gauges no longer count."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def live_workers() -> int | None:
    """How many workers are up, as the master sees them: each has a file of
    live gauges, made as it starts and removed by the master as it reaps it
    (worker_died). None without metrics."""
    path = os.environ.get(ENV)
    if not path:
        return None
    try:
        names = os.listdir(path)
    except OSError:
        return None
    return len({name for name in names if name.startswith("gauge_livesum_") and name.endswith(".db")})


def enabled() -> bool:
    return bool(os.environ.get(ENV))


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram
        self.requests = Counter("rproxy_requests", "Requests answered",
                                ["route", "upstream", "method", "status"])
        self.duration = Histogram("rproxy_request_duration_seconds", "Time from request to the last byte sent",
                                  ["route"], buckets=BUCKETS)
        self.upstream_duration = Histogram("rproxy_upstream_duration_seconds",
                                           "Time from sending upstream to its response head",
                                           ["upstream"], buckets=BUCKETS)
        self.in_flight = Gauge("rproxy_requests_in_flight", "Requests being answered",
                               multiprocess_mode="livesum")
        self.tunnels = Gauge("rproxy_tunnels_open", "Open WebSocket/upgrade tunnels",
                             multiprocess_mode="livesum")
        self.server_up = Gauge("rproxy_upstream_server_up", "1 when a server is in rotation (every worker agrees)",
                               ["upstream", "server"], multiprocess_mode="livemin")
        self.server_busy = Gauge("rproxy_upstream_server_in_flight", "Requests and tunnels under way per server",
                                 ["upstream", "server"], multiprocess_mode="livesum")
        self.rate_limited = Counter("rproxy_rate_limited", "Requests refused by a rate limit", ["limit"])
        self.cache = Counter("rproxy_cache_responses", "Responses by cache outcome", ["result"])
        self.cache_bytes = Counter("rproxy_cache_hit_bytes", "Body bytes served from the cache")
        self.cache_purges = Counter("rproxy_cache_purges", "Purge requests done, by kind", ["kind"])
        self.cache_purged = Counter("rproxy_cache_purged_entries", "Stored URLs removed by purges")
        # Labelled by the section that uses the storage: rate_limit:NAME, cache:NAME.
        self.storage_errors = Counter("rproxy_storage_errors", "Storage (Redis) calls that failed or timed out",
                                      ["user"])
        self.storage_skipped = Counter("rproxy_storage_skipped",
                                       "Requests that went without the storage while it was left alone",
                                       ["user"])
        self.storage_down = Gauge("rproxy_storage_down", "1 while a worker leaves the storage alone after a failure",
                                  ["user"], multiprocess_mode="livemax")


def get() -> Metrics | None:
    """The worker's metrics, or None when no admin listener asks for them."""
    global _metrics, _looked
    if not _looked:
        _looked = True
        if enabled():
            _metrics = Metrics()
    return _metrics


# Label values come from the config, or from these closed sets: a client
# cannot grow the number of series by inventing methods.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def status_class(status) -> str:
    text = str(status)
    return f"{text[0]}xx" if text[:1].isdigit() else "other"


class _Children(dict):
    """Labelled series, looked up once: labels() is the costly part of a count."""

    def __init__(self, family):
        super().__init__()
        self.family = family

    def __missing__(self, labels):
        child = self[labels] = self.family.labels(*labels)
        return child


_series: dict[str, _Children] = {}


def observe_request(environ: dict, status, seconds: float) -> None:
    metrics = get()
    if metrics is None:
        return
    if not _series:
        _series.update(requests=_Children(metrics.requests), duration=_Children(metrics.duration),
                       upstream=_Children(metrics.upstream_duration))
    record = environ.get(RECORD) or NOTHING
    route = record.route or "-"
    upstream = record.upstream or "-"
    method = environ.get("REQUEST_METHOD", "-")
    _series["requests"][route, upstream, method if method in METHODS else "OTHER", status_class(status)].inc()
    _series["duration"][route, ].observe(seconds)
    if record.upstream_ms is not None:
        _series["upstream"][upstream, ].observe(record.upstream_ms / 1000)
    if record.in_flight:
        record.in_flight = False
        metrics.in_flight.dec()


_certificate_stores: "weakref.WeakSet" = weakref.WeakSet()


def serve_certificates(store) -> None:
    """In a worker: `store` (a CertificateStore) is what its handshakes are
    served from; /metrics tells how long each of its certificates has left."""
    _certificate_stores.add(store)


class _CertificateExpiry:
    """rproxy_certificate_expiry_seconds, worked out when scraped (a value
    stored once would stop counting down), from the certificates the
    answering worker serves: every worker serves the same files, and looks
    at them again now."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        family = GaugeMetricFamily("rproxy_certificate_expiry_seconds",
                                   "Seconds until the certificate served for a name expires (negative: expired)",
                                   labels=["name"])
        now = time.time()
        expiries: dict[str, float] = {}
        for store in list(_certificate_stores):
            store.refresh()
            for name, not_after in store.expiries().items():
                expiries.setdefault(name, not_after)
        for name, not_after in sorted(expiries.items()):
            family.add_metric([name], not_after - now)
        yield family


def render() -> tuple[bytes, str]:
    """The exposition text of every worker's values."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if _certificate_stores:
        registry.register(_CertificateExpiry())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def snapshot() -> dict:
    """Every worker's values as plain data, for the status page."""
    from prometheus_client import CollectorRegistry, multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    out: dict = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, []).append({"labels": sample.labels, "value": sample.value})
    return out
