"""How a server is chosen for each request, among those that are available.

round_robin    smooth weighted round robin (nginx's): weight=2 takes two turns
               in three, spread out rather than in a burst.
least_conn     fewest requests in flight in this worker, relative to weight.
hash, ip_hash  consistent hashing of a key (client IP, a header, the path) on
               a ring of weighted points: a server that leaves moves only its
               own share of keys, to the servers after it on the ring.
random         two random choices (by weight), the one with fewer in flight.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from rproxy.upstreams.servers import Server

# Ring points per unit of weight: enough for an even spread over few servers.
POINTS_PER_WEIGHT = 160


def _hash(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


class RoundRobin:
    name = "round_robin"

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = servers

    def pick(self, available: list[Server], key: str | None = None) -> Server:
        if len(available) == 1:
            return available[0]
        total, best = 0, None
        for server in available:
            server.current_weight += server.weight
            total += server.weight
            if best is None or server.current_weight > best.current_weight:
                best = server
        assert best is not None  # `available` is never empty
        best.current_weight -= total
        return best


class LeastConn:
    name = "least_conn"

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = servers
        self._turn = 0

    def pick(self, available: list[Server], key: str | None = None) -> Server:
        # Rotate the starting point so that ties do not all land on the first.
        self._turn = (self._turn + 1) % len(available)
        ordered = available[self._turn:] + available[:self._turn]
        return min(ordered, key=lambda s: s.in_flight / s.weight)


class ConsistentHash:
    name = "hash"

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = servers
        points = sorted((_hash(f"{server.label}#{i}"), index)
                        for index, server in enumerate(servers)
                        for i in range(POINTS_PER_WEIGHT * server.weight))
        self._keys = [p for p, _ in points]
        self._owners = [servers[i] for _, i in points]

    def pick(self, available: list[Server], key: str | None = None) -> Server:
        if len(available) == 1:
            return available[0]
        allowed = set(map(id, available))
        start = bisect.bisect(self._keys, _hash(key or ""))
        ring = len(self._owners)
        for step in range(ring):
            owner = self._owners[(start + step) % ring]
            if id(owner) in allowed:
                return owner
        return available[0]


class RandomTwo:
    name = "random"

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = servers

    def pick(self, available: list[Server], key: str | None = None) -> Server:
        if len(available) == 1:
            return available[0]
        weights = [s.weight for s in available]
        first, second = random.choices(available, weights, k=2)
        if first is second:
            return first
        return min((first, second), key=lambda s: s.in_flight / s.weight)


class Policy(Protocol):
    name: str

    def __init__(self, servers: Sequence[Server]) -> None: ...

    def pick(self, available: list[Server], key: str | None = None) -> Server: ...


POLICIES: dict[str, type[Policy]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConn,
    "hash": ConsistentHash,
    "ip_hash": ConsistentHash,
    "random": RandomTwo,
}
