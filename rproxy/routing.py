"""Which route serves a request: by host, then by the longest path prefix.

Hosts are tried from the most specific down: the exact host, then wildcards
(`*.example.com` matches any sub-domain, the longest suffix first), then the
routes that name no host. Within a host, the longest prefix that matches by
whole path segments wins (`/api` matches `/api` and `/api/x`, not `/apix`).
If a host's routes have no matching prefix, the less specific hosts are tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


def prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/":
        return True
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def host_matches(pattern: str, host: str) -> bool:
    """'' matches any host; '*.example.com' any sub-domain; else exactly."""
    if not pattern:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True)
class Match(Generic[T]):
    target: T
    prefix: str
    host_pattern: str   # '' when the route names no host


class Router(Generic[T]):
    def __init__(self, entries: Iterable[tuple[tuple[str, ...], str, T]]):
        """entries: (host patterns, path prefix, target); empty hosts = any host."""
        self._exact: dict[str, list[tuple[str, T]]] = {}
        wildcards: dict[str, list[tuple[str, T]]] = {}
        self._any: list[tuple[str, T]] = []
        for hosts, prefix, target in entries:
            for host in hosts or ("",):
                if not host:
                    self._any.append((prefix, target))
                elif host.startswith("*."):
                    wildcards.setdefault(host[1:], []).append((prefix, target))
                else:
                    self._exact.setdefault(host, []).append((prefix, target))
        by_length = lambda item: -len(item[0])  # noqa: E731
        for table in (*self._exact.values(), *wildcards.values(), self._any):
            table.sort(key=by_length)
        # ('.example.com', routes), longest suffix first
        self._wild = sorted(wildcards.items(), key=lambda kv: -len(kv[0]))

    def match(self, host: str, path: str) -> Match[T] | None:
        table = self._exact.get(host)
        if table:
            found = self._first(table, path)
            if found:
                return Match(found[1], found[0], host)
        for suffix, table in self._wild:
            if host.endswith(suffix) and len(host) > len(suffix):
                found = self._first(table, path)
                if found:
                    return Match(found[1], found[0], "*" + suffix)
        found = self._first(self._any, path)
        return Match(found[1], found[0], "") if found else None

    @staticmethod
    def _first(table: list[tuple[str, T]], path: str) -> tuple[str, T] | None:
        for prefix, target in table:
            if prefix_matches(prefix, path):
                return prefix, target
        return None
