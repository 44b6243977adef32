"""The most lenient upstream there is, for judging what the proxy forwarded:
it drops a fragment, decodes escapes (once), reads `\\` as `/`, drops path
parameters (Tomcat, Jetty), trailing dots and spaces (Windows) and case
(IIS, Caddy's matchers), resolves dot segments, and runs `x.php` for
`/x.php/more` (PHP's PATH_INFO). A denied resource must stay out of its reach.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from urllib.parse import unquote


def reading(target: str) -> str:
    path = unquote(target.split("#", 1)[0].split("?", 1)[0]).replace("\\", "/")
    segments: list[str] = []
    for segment in path.split("/"):
        segment = segment.split(";", 1)[0].rstrip(" ")
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment.rstrip(". ").lower())
    return "/" + "/".join(segments)


def reaches(target: str, prefixes: tuple[str, ...], globs: tuple[str, ...]) -> bool:
    """Could the lenient upstream serve something `prefixes` or `globs` deny?"""
    path = reading(target)
    if any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes):
        return True
    parents = ["/".join(path.split("/")[:n]) for n in range(2, path.count("/") + 2)]
    return any(fnmatchcase(parent, glob) for parent in parents for glob in globs)
