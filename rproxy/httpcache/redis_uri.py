"""A Redis client from a storage URI, in the forms the `limits` library
takes, so that one URI configures the rate limit and the cache alike:

    redis://[:password@]host:port/db           one server
    rediss://...                               the same over TLS
    redis+sentinel://[:password@]host:port[,host:port...]/service[/db]
                                               the master Sentinel names
    redis+cluster://[:password@]host:port[,host:port...]
                                               a Redis Cluster, from these nodes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

SCHEMES = ("redis", "rediss", "redis+sentinel", "redis+cluster")


@dataclass(frozen=True)
class RedisURI:
    scheme: str
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    service: str | None  # Sentinel's name of the master
    db: int
    options: tuple[tuple[str, str], ...]


def parse(uri: str) -> RedisURI:
    """ValueError, saying what is wrong, for a URI that names no server."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: the scheme is not one of {', '.join(s + '://' for s in SCHEMES)}")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        credentials, _, netloc = netloc.rpartition("@")
        user, colon, secret = credentials.partition(":")
        username, password = (unquote(user) or None, unquote(secret)) if colon else (None, unquote(user))
    nodes = []
    for node in filter(None, netloc.split(",")):
        default = "26379" if scheme == "redis+sentinel" else "6379"
        if node.startswith("["):  # [::1]:6379
            host, _, port = node[1:].partition("]")
            port = port[1:] if port.startswith(":") else (port or default)
        else:
            host, colon, port = node.rpartition(":")
            host, port = (host, port) if colon else (node, default)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{uri!r}: {node!r} is not host:port")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError(f"{uri!r} names no server")
    if len(nodes) > 1 and scheme in ("redis", "rediss"):
        raise ValueError(f"{uri!r}: several servers need redis+sentinel:// or redis+cluster://")
    parts = [p for p in path.split("/") if p]
    service = None
    if scheme == "redis+sentinel":
        if not parts:
            raise ValueError(f"{uri!r}: name the master's service: redis+sentinel://host:26379/mymaster")
        service = unquote(parts.pop(0))
    if scheme == "redis+cluster" and parts:
        raise ValueError(f"{uri!r}: a cluster has no database number")
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError(f"{uri!r}: {'/'.join(parts)!r} is not a database number")
    return RedisURI(scheme, tuple(nodes), username, password, service, int(parts[0]) if parts else 0,
                    tuple(parse_qsl(query)))


def client(uri: str, timeout: float):
    """A redis-py client for `uri`: Redis, the Sentinel's master, or RedisCluster."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.sentinel import Sentinel
    parsed = parse(uri)
    # Any: redis-py's constructors take dozens of differently typed keywords.
    timeouts: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    if parsed.scheme == "redis+sentinel":
        sentinel = Sentinel(list(parsed.nodes), sentinel_kwargs={**timeouts, **auth}, **timeouts)
        return sentinel.master_for(parsed.service, db=parsed.db, **auth, **timeouts)
    if parsed.scheme == "redis+cluster":
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in parsed.nodes], **auth, **timeouts)
    return redis.Redis.from_url(uri, **timeouts)  # rediss:// and its ssl_* query options too
