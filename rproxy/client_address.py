"""X-Forwarded-* and X-Real-IP: who the client is, believed only from trusted peers.

A peer listed in `[server] trusted_proxies` (a load balancer in front of us)
may tell us the client's address, scheme and host; its headers are kept and
extended. Anyone else's are dropped and replaced, so a client cannot forge
its address to the upstream or to the rate limiter. So are the other headers
only a proxy in front should set, which applications trust as much: every
X-Forwarded-*, and the `spoofable_headers` list (True-Client-IP,
CF-Connecting-IP, X-Original-URL, ...).

Header names reach us through the WSGI environ (HTTP_X_CLIENT_IP), where
case is gone and gunicorn drops names with underscores (X_Client_IP) rather
than mapping them onto the dashed ones; names are compared in lower case.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

from rproxy.messages import Request, header_environ_key, valid_host

# Replaced for untrusted peers whatever spoofable_headers says.
_FORWARDING = ("x-real-ip", "forwarded")
_FORWARDING_PREFIX = "x-forwarded-"


class Forwarding:
    def __init__(self, trusted_networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 spoofable_headers: Iterable[str] = ()) -> None:
        self.trusted = tuple(trusted_networks)
        self._verdicts: dict[str, bool] = {}
        self.spoofable = frozenset((*_FORWARDING, *(name.lower() for name in spoofable_headers)))

    def is_trusted(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in net for net in self.trusted)
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict

    def apply(self, request: Request) -> None:
        """Set request.client_ip and the forwarding headers sent upstream."""
        headers = request.headers
        peer = request.peer
        if self.is_trusted(peer):
            chain = headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
            request.client_ip = self.client_from_chain(chain, peer)
            # Believed, but only when well-formed: the upstream builds URLs from these.
            if headers.get("X-Forwarded-Proto", "").lower() not in ("http", "https"):
                headers["X-Forwarded-Proto"] = request.scheme
            forwarded_host = headers.get("X-Forwarded-Host")
            if forwarded_host is None or not all(valid_host(h.strip()) for h in forwarded_host.split(",")):
                headers["X-Forwarded-Host"] = headers.get("Host", "")
            headers.setdefault("X-Real-Ip", request.client_ip)
        else:
            self.strip(request)
            headers["X-Forwarded-For"] = peer
            headers["X-Forwarded-Proto"] = request.scheme
            headers["X-Forwarded-Host"] = headers.get("Host", "")
            headers["X-Real-Ip"] = peer
        if not headers["X-Forwarded-Host"]:
            del headers["X-Forwarded-Host"]

    def strip(self, request: Request) -> None:
        """Remove what only a trusted proxy may say, from the headers sent
        upstream and from the environ the middlewares read (a hash_key or a
        rate-limit key on such a header would believe it too)."""
        headers = request.headers
        spoofable = self.spoofable
        for name in [n for n in headers if (lower := n.lower()) in spoofable
                     or lower.startswith(_FORWARDING_PREFIX)]:
            del headers[name]
            request.environ.pop(header_environ_key(name), None)

    def client_from_chain(self, chain: str | None, peer: str) -> str:
        """The right-most address in the chain that is not a trusted proxy."""
        if not chain:
            return peer
        for hop in reversed(chain.split(",")):
            hop = hop.strip()
            if not self.is_trusted(hop):
                try:
                    ipaddress.ip_address(hop)
                except ValueError:
                    return peer  # garbage in the chain: trust only what we saw
                return hop
        return chain.split(",")[0].strip() or peer
