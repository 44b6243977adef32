"""Active health checks: one greenlet per upstream and worker asks each
server `health_check` every `health_interval`; a server that fails is out of
rotation until it passes again, and then its passive failures are forgotten
too. (Passive health, from real requests, lives with the server's state in
upstream.py.)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout

from rproxy.upstreams import client_tls

if TYPE_CHECKING:
    from rproxy.upstreams.servers import Server, Upstream

log = logging.getLogger("rproxy.health")


class ActiveCheck:
    def __init__(self, upstream: Upstream) -> None:
        config = upstream.config
        self.upstream = upstream
        assert config.health_check is not None  # only an upstream with a check gets one
        self.method, self.path = config.health_check
        self.interval = config.health_interval
        self.timeout = Timeout(connect=config.health_timeout, read=config.health_timeout)
        self.statuses = config.health_status
        # A pool of its own per server, so checks never wait behind traffic.
        self.pools: dict[Server, HTTPConnectionPool] = {}
        for server in upstream.servers:
            address = server.address
            pool: HTTPConnectionPool
            if address.scheme == "https":
                assert upstream.tls_context is not None  # made when any server is https://
                tls = client_tls.pool_options(config, address.host, upstream.tls_context)
                pool = HTTPSConnectionPool(address.host, address.port, maxsize=1, retries=False, **tls)
            else:
                pool = HTTPConnectionPool(address.host, address.port, maxsize=1, retries=False)
            self.pools[server] = pool
        self.greenlet = None

    def start(self) -> None:
        if self.greenlet is None:
            self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            for server in self.upstream.servers:
                ok, why = self.check(server)
                # Passing while out of rotation, by this check's verdict or by
                # passive health (a restart quicker than an interval is never
                # seen failing here): back in at once, not after fail_timeout.
                if ok and (not server.healthy or server.passive.until):
                    log.info("upstream %s: server %s passes its health check again",
                             self.upstream.name, server.label)
                    self.upstream.recovered(server)
                elif not ok and server.healthy:
                    log.warning("upstream %s: server %s fails its health check (%s); "
                                "out of rotation", self.upstream.name, server.label, why)
                    server.healthy = False
                    server.mark()
            gevent.sleep(self.interval)

    def check(self, server: Server) -> tuple[bool, str]:
        try:
            response = self.pools[server].urlopen(
                self.method, self.path, headers={"Host": server.label, "User-Agent": "rproxy-health"},
                timeout=self.timeout, retries=False, redirect=False, assert_same_host=False,
                preload_content=True)
        except Exception as e:  # refused, timed out, reset, malformed: all mean unhealthy
            return False, str(e) or type(e).__name__
        if response.status in self.statuses:
            return True, ""
        return False, f"status {response.status}"

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
        for pool in self.pools.values():
            pool.close()
