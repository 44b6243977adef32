"""Upstream servers: one urllib3 connection pool per server, the choice of
server for each request (balancing.py), and each server's health as this
worker sees it: passive (real requests that fail, counted by a circuit
breaker, breaker.py) and active (health.py).

Passive health follows nginx: a server that fails `max_fails` times within
`fail_timeout` is out of rotation for `fail_timeout`, then one request tries
it again. Every server of a group can be out; requests then get 503 with
Retry-After at once instead of a connect attempt each. Only a group of one
server is exempt: it is all there is.

Pools are made once per worker process (after the fork) and keep connections
alive across requests: up to `pool_size` idle ones, opening more when needed
and closing the surplus after use, as nginx's `keepalive N` does. At most
`max_connections` are open at once (256 by default; 0 = no cap): requests
beyond it wait, in order, up to connect_timeout for one to come back, then
get 503, so that no burst or client holding its responses can open more
connections to a server than it was sized for.
"""

from __future__ import annotations

import logging
import math
import queue
import ssl
import time
from typing import TYPE_CHECKING, Any, Collection, cast

from gevent.lock import Semaphore
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection
from urllib3.exceptions import ClosedPoolError, EmptyPoolError
from urllib3.util.connection import is_connection_dropped

from rproxy.config.addresses import ServerAddress
from rproxy.config.sections import UpstreamConfig
from rproxy.messages import Request, header_environ_key
from rproxy.observability import metrics
from rproxy.server.sockets import readable_now
from rproxy.upstreams import client_tls
from rproxy.upstreams.balancing import POLICIES, ConsistentHash
from rproxy.upstreams.breaker import Breaker, State
from rproxy.upstreams.health import ActiveCheck

log = logging.getLogger("rproxy.upstream")


# The mixin below is written for a pool class: the type checker sees it as one.
if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection  # urllib3's own annotation of a connection

    _Pool = HTTPConnectionPool
else:
    _Pool = object


class _QuietSurplus(_Pool):
    """Close connections beyond the pool's size without urllib3's warning:
    for a proxy under a burst that is the expected way to shed them. And
    check an idle connection for a close by the upstream with one peek:
    urllib3's check polls through gevent's select.poll, which costs as
    much as a greenlet switch, once per request.

    `cap` > 0 bounds the connections in use (every _get_conn is paired with
    one _put_conn): an idle one is reused before a new one is opened, so
    in use plus idle never exceeds it either."""

    def __init__(self, *args: Any, cap: int = 0, **kwargs: Any) -> None:
        self._in_use = Semaphore(cap) if cap else None
        kwargs["block"] = False
        super().__init__(*args, **kwargs)

    def _get_conn(self, timeout: float | None = None) -> HTTPConnection:
        in_use = self._in_use
        if in_use is not None and not in_use.acquire(timeout=timeout):
            raise EmptyPoolError(self, "every connection is in use (max_connections)")
        pool = self.pool
        if pool is None:  # the pool was closed
            if in_use is not None:
                in_use.release()
            raise ClosedPoolError(self, "Pool is closed.")
        conn: HTTPConnection | None
        try:
            conn = pool.get(block=False)  # urllib3's LIFO queue: None for a slot without a connection yet
        except queue.Empty:
            conn = None
        if conn is not None and conn.sock is not None and _closed_or_stray(conn):
            conn.close()  # reconnects when used
        return conn or cast(HTTPConnection, self._new_conn())  # ConnectionCls: HTTP(S)Connection

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        if self._in_use is not None:
            self._in_use.release()
        if self.pool is not None:
            try:
                self.pool.put(conn, block=False)
                return
            except Exception:  # queue.Full, or the pool was closed meanwhile
                pass
        if conn is not None:
            conn.close()


def _closed_or_stray(conn: HTTPConnection) -> bool:
    """Has an idle connection become readable: closed by the upstream
    (EOF, reset) or holding bytes nobody asked for? Either way it cannot
    carry the next request."""
    readable = readable_now(conn.sock)
    return is_connection_dropped(conn) if readable is None else readable


class ServerPool(_QuietSurplus, HTTPConnectionPool):
    pass


class TLSServerPool(_QuietSurplus, HTTPSConnectionPool):
    pass


class Server:
    """One upstream server: its pool of kept-alive connections, and what this
    worker knows of its health."""

    __slots__ = ("address", "label", "weight", "pool", "current_weight", "in_flight",
                 "healthy", "passive", "up_gauge", "busy_gauge", "__weakref__")

    def __init__(self, address: ServerAddress, config: UpstreamConfig,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.label = address.authority
        self.weight = address.weight
        self.current_weight = 0   # round robin's running score
        self.in_flight = 0        # requests and tunnels under way in this worker
        self.healthy = True       # the active health check's verdict
        # Passive health: max_fails failures within fail_timeout take it out
        # for fail_timeout.
        self.passive = Breaker(config.max_fails, config.fail_timeout, config.fail_timeout)
        counters = metrics.get()
        self.up_gauge = counters.server_up.labels(config.name, self.label) if counters else None
        self.busy_gauge = counters.server_busy.labels(config.name, self.label) if counters else None
        if self.up_gauge is not None:
            self.up_gauge.set(1)
        tls: dict[str, Any] = {}
        pool_cls: type[ServerPool] | type[TLSServerPool]
        if address.scheme == "https":
            assert tls_context is not None  # the upstream makes one when it has https:// servers
            pool_cls = TLSServerPool
            tls = client_tls.pool_options(config, address.host, tls_context)
        else:
            pool_cls = ServerPool
        self.pool = pool_cls(
            address.host, address.port,
            maxsize=config.pool_size,
            cap=config.max_connections,
            retries=False,
            **tls,
        )

    def begin(self) -> None:
        """A request or tunnel starts on this server."""
        self.in_flight += 1
        if self.busy_gauge is not None:
            self.busy_gauge.inc()

    def end(self) -> None:
        self.in_flight -= 1
        if self.busy_gauge is not None:
            self.busy_gauge.dec()

    def mark(self) -> None:
        """Tell the metrics whether this server is in rotation (a server
        back from fail_timeout counts once a request has succeeded on it)."""
        if self.up_gauge is not None:
            self.up_gauge.set(1 if self.healthy and not self.passive.until else 0)

    def available(self, now: float) -> bool:
        # Back from a passive fail_timeout: one request at a time tries it.
        passive = self.passive
        return self.healthy and (not passive.until or passive.usable(now))

    def close(self) -> None:
        self.pool.close()


class Upstream:
    """A named group of servers, the policy that picks one per request, and
    the passive health bookkeeping that keeps failing servers out."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.name = config.name
        self.config = config
        # One TLS client context for all of its https:// servers.
        self.tls_context = (client_tls.client_context(config)
                            if any(a.scheme == "https" for a in config.servers) else None)
        self.servers = [Server(address, config, self.tls_context) for address in config.servers]
        self.policy = POLICIES[config.balance](self.servers)
        key = config.hash_key if config.balance == "hash" else "ip"
        self._header = header_environ_key(key[len("header:"):]) if key.startswith("header:") else None
        self._key_is_path = key == "path"
        self.active_check = ActiveCheck(self) if config.health_check else None
        self.all_out = False  # "no server is available" was logged

    def start(self) -> None:
        if self.active_check is not None:
            self.active_check.start()

    def hash_key(self, request: Request) -> str:
        if self._header is not None:
            value: str = request.environ.get(self._header, "")
            return value
        if self._key_is_path:
            return request.path
        return request.client_ip

    def pick(self, request: Request, exclude: Collection[Server] = ()) -> Server | None:
        """A server for this request, or None when none is available. The
        caller reports how it went (succeeded, failed) or, when the server was
        never put to the test, done_with."""
        now = time.monotonic()
        available = [s for s in self.servers if s not in exclude and s.available(now)]
        if not available:
            return None
        key = self.hash_key(request) if isinstance(self.policy, ConsistentHash) else None
        server = self.policy.pick(available, key)
        server.passive.claim(now)
        return server

    def any_available(self, exclude: Collection[Server] = ()) -> bool:
        """Is there a server left to try? (No side effect, unlike pick.)"""
        now = time.monotonic()
        return any(s not in exclude and s.available(now) for s in self.servers)

    def unavailable(self) -> int:
        """No server can take a request: said once per outage in the log.
        Returns the seconds until one may be back, for a 503's Retry-After."""
        now = time.monotonic()
        waits = [self.config.health_interval if not s.healthy else s.passive.retry_in(now)
                 for s in self.servers]
        retry_after = max(1, math.ceil(min(waits)))
        if not self.all_out:
            self.all_out = True
            log.error("upstream %s: no server is available (%s); answering 503 with Retry-After "
                      "until one is back", self.name, ", ".join(self._why_out(s, now) for s in self.servers))
        return retry_after

    def _why_out(self, server: Server, now: float) -> str:
        if not server.healthy:
            return f"{server.label} fails its health check"
        state = server.passive.state(now)
        if state is State.OPEN:
            return f"{server.label} out for {server.passive.retry_in(now):.0f}s more"
        if state is State.TRYING:
            return f"{server.label} being tried again"
        return f"{server.label} {state.value}"

    def failed(self, server: Server, why: str) -> None:
        """Passive health: a connect error, timeout, reset or listed status."""
        config = self.config
        # As nginx: a lone server is never taken out, it is all there is.
        if not config.max_fails or len(self.servers) == 1:
            return
        now = time.monotonic()
        was = server.passive.state(now)
        if not server.passive.failed(now):
            return
        server.mark()
        if was is State.CLOSED:
            log.warning("upstream %s: server %s out of rotation for %gs after %d failure(s) within %gs, "
                        "last: %s", self.name, server.label, config.fail_timeout, config.max_fails,
                        config.fail_timeout, why)
        else:
            log.info("upstream %s: server %s still failing (%s); out of rotation for %gs more",
                     self.name, server.label, why, config.fail_timeout)

    def succeeded(self, server: Server) -> None:
        if server.passive.succeeded():
            log.info("upstream %s: server %s is answering again", self.name, server.label)
            server.mark()
            self.all_out = False

    def done_with(self, server: Server) -> None:
        """The request that picked `server` is done with it. A trial that
        gave no verdict (the client went away first, the pool was full)
        lets the next request try."""
        server.passive.abandoned()

    def recovered(self, server: Server) -> None:
        """The active check passes again: its failures, passive ones
        included, are history."""
        server.healthy = True
        server.passive.succeeded()
        server.mark()
        self.all_out = False

    def close(self) -> None:
        if self.active_check is not None:
            self.active_check.stop()
        for server in self.servers:
            server.close()
