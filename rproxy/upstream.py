"""Upstream servers: one urllib3 connection pool per server, and the choice
of server for each request.

Pools are made once per worker process (after the fork) and keep connections
alive across requests. With `max_connections = 0` a pool keeps up to
`pool_size` idle connections and opens more when needed, closing the surplus
after use, as nginx's `keepalive N` does; with a cap, requests beyond it wait
for a free connection.
"""

from __future__ import annotations

import logging

from urllib3 import HTTPConnectionPool, HTTPSConnectionPool

from .config import UpstreamConfig
from .values import ServerAddress

log = logging.getLogger("rproxy.upstream")


class _QuietSurplus:
    """Close connections beyond the pool's size without urllib3's warning:
    for a proxy under a burst that is the expected way to shed them."""

    def _put_conn(self, conn):
        if self.pool is not None:
            try:
                self.pool.put(conn, block=False)
                return
            except Exception:  # queue.Full, or the pool was closed meanwhile
                pass
        if conn is not None:
            conn.close()


class ServerPool(_QuietSurplus, HTTPConnectionPool):
    pass


class TLSServerPool(_QuietSurplus, HTTPSConnectionPool):
    pass


class Server:
    """One upstream server and its pool of kept-alive connections."""

    __slots__ = ("address", "label", "weight", "pool", "current_weight")

    def __init__(self, address: ServerAddress, config: UpstreamConfig):
        self.address = address
        self.label = address.authority
        self.weight = address.weight
        self.current_weight = 0
        capped = config.max_connections > 0
        tls = {}
        if address.scheme == "https":
            pool_cls = TLSServerPool
            if config.ca_file:
                tls["ca_certs"] = config.ca_file
        else:
            pool_cls = ServerPool
        self.pool = pool_cls(
            address.host, address.port,
            maxsize=config.max_connections if capped else config.pool_size,
            block=capped,
            retries=False,
            **tls,
        )

    def close(self) -> None:
        self.pool.close()


class Upstream:
    """A named group of servers and the policy that picks one per request."""

    def __init__(self, config: UpstreamConfig):
        self.name = config.name
        self.config = config
        self.servers = [Server(address, config) for address in config.servers]
        self._total_weight = sum(s.weight for s in self.servers)

    def pick(self) -> Server:
        """Smooth weighted round robin (as nginx): weight=2 takes two turns in
        three, spread out rather than in a burst."""
        servers = self.servers
        if len(servers) == 1:
            return servers[0]
        best = None
        for server in servers:
            server.current_weight += server.weight
            if best is None or server.current_weight > best.current_weight:
                best = server
        best.current_weight -= self._total_weight
        return best

    def close(self) -> None:
        for server in self.servers:
            server.close()
