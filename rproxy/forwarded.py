"""X-Forwarded-* and X-Real-IP: who the client is, believed only from trusted peers.

A peer listed in `[server] trusted_proxies` (a load balancer in front of us)
may tell us the client's address, scheme and host; its headers are kept and
extended. Anyone else's are dropped and replaced, so a client cannot forge
its address to the upstream or to the rate limiter.
"""

from __future__ import annotations

import ipaddress

from .http import Request, valid_host

_SPOOFABLE = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host",
              "X-Forwarded-Port", "X-Real-Ip", "Forwarded")


class Forwarding:
    def __init__(self, trusted_networks):
        self.trusted = tuple(trusted_networks)
        self._verdicts: dict[str, bool] = {}

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
            for name in _SPOOFABLE:
                headers.pop(name, None)
            headers["X-Forwarded-For"] = peer
            headers["X-Forwarded-Proto"] = request.scheme
            headers["X-Forwarded-Host"] = headers.get("Host", "")
            headers["X-Real-Ip"] = peer
        if not headers["X-Forwarded-Host"]:
            del headers["X-Forwarded-Host"]

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
