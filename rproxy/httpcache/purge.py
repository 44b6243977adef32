"""Purge: removing stored responses on request, by URL, by URL prefix, or by
tag. An upstream tags a response with Surrogate-Key (tags separated by
spaces, as Fastly's) or Cache-Tag (separated by commas, as Cloudflare's); a
purge of a tag removes every stored URL that one of its variants tagged so.

What is purged is a key (cache_key: scheme://host/target), so a URL given
to purge names the scheme and Host the clients used. The admin listener
(admin.py) takes the request; the stores (store.py, disk.py) do the work,
each where every worker and instance sharing it sees the result at once.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from rproxy.httpcache.rules import Entry

TAG_HEADERS = {"surrogate-key": re.compile(r"\s+"), "cache-tag": re.compile(r"\s*,\s*")}
KINDS = ("url", "prefix", "tag")


def tags_of(headers) -> set[str]:
    """The tags a stored response's headers give it."""
    found: set[str] = set()
    for name, value in headers:
        split = TAG_HEADERS.get(name.lower())
        if split is not None:
            found.update(tag for tag in split.split(value.strip()) if tag)
    return found


def entries_tags(entries: list[Entry]) -> set[str]:
    tags: set[str] = set()
    for entry in entries:
        tags |= tags_of(entry.headers)
    return tags


def parse_request(query: str, form: str) -> tuple[str, str]:
    """(kind, value) from a purge request's query string or form body:
    exactly one of url=, prefix=, tag=. ValueError says what is wrong."""
    fields = parse_qsl(query, keep_blank_values=True) + parse_qsl(form, keep_blank_values=True)
    given = [(k, v) for k, v in fields if k in KINDS]
    unknown = sorted({k for k, _ in fields if k not in KINDS})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}: purge takes one of url=, prefix=, tag=")
    if len(given) != 1 or not given[0][1]:
        raise ValueError("purge takes exactly one non-empty field: url=, prefix= or tag=")
    kind, value = given[0]
    if kind in ("url", "prefix") and not re.match(r"https?://[^/\s]+", value):
        raise ValueError(f"{kind}={value!r}: give scheme and host, as clients ask: http://example.com/path")
    if kind in ("url", "prefix"):  # keys hold the scheme and Host in lower case
        scheme, _, rest = value.partition("://")
        host, slash, target = rest.partition("/")
        value = f"{scheme.lower()}://{host.lower()}{slash or ('/' if kind == 'url' else '')}{target}"
    return kind, value
