"""`rproxy explain CONFIG URL`: which route a request takes, and why.

Runs the request through the same code the proxy runs (Request, forwarding
headers, router, balancing policy) without sending anything, and prints what
matched, what the route does with the request, and which server it would go to.
"""

from __future__ import annotations

from typing import Sequence

from rproxy import config as config_module
from rproxy.client_address import Forwarding
from rproxy.messages import BadRequest, Request
from rproxy.middleware.cache import cache_key
from rproxy.middleware.filter import PathFilter, canonical
from rproxy.routing import Router, host_matches, prefix_matches
from rproxy.target import without_prefix
from rproxy.upstreams.servers import Upstream


def _environ(url: str, method: str, headers: list[tuple[str, str]], client: str) -> dict:
    # The target exactly as written (a fragment too), as a raw client sends it.
    scheme, _, rest = url.partition("://") if "://" in url else ("http", "", url)
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    netloc, target = rest[:end], rest[end:]
    if not target.startswith("/"):
        target = "/" + target
    environ = {
        "REQUEST_METHOD": method.upper(), "RAW_URI": target, "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": client, "wsgi.url_scheme": scheme, "HTTP_HOST": netloc,
    }
    for name, value in headers:
        key = name.upper().replace("-", "_")
        environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
    return environ


def _seconds(value: float) -> str:
    return f"{value:g}s"


def explain(config: config_module.Config, url: str, method: str = "GET",
            headers: Sequence[tuple[str, str]] = (), client: str = "127.0.0.1") -> tuple[int, str]:
    """(exit code, text): 0 when a route matches, 1 when the proxy would answer itself."""
    environ = _environ(url, method, list(headers), client)
    out = [f"{environ['REQUEST_METHOD']} {url}"]
    try:
        request = Request.from_environ(environ)
    except BadRequest as e:
        out.append(f"answer       {e.status}: {e} (the proxy answers itself)")
        return 1, "\n".join(out)
    Forwarding(config.server.trusted_proxies, config.server.spoofable_headers).apply(request)
    router = Router([(rc.host, rc.path, rc) for rc in config.routes])
    match = router.match(request.host, request.path)
    if match is None:
        out.append(f"answer       404: no route for host {request.host or '(none)'} and path {request.path}")
        return 1, "\n".join(out)
    route = match.target
    host_why = (f"host {request.host} matches {match.host_pattern}" if match.host_pattern
                else "any host (the route names none)")
    shorter = sorted({rc.path for rc in config.routes
                      if rc is not route and rc.path != match.prefix and prefix_matches(rc.path, request.path)
                      and any(host_matches(h, request.host) for h in rc.host or ("",))},
                     key=len, reverse=True)
    prefix_why = f"path prefix {match.prefix}"
    if shorter:
        prefix_why += f" (longest of {', '.join([match.prefix, *shorter])})"
    out.append(f"route        {route.name}  [route:{route.name}] in {config.path}")
    out.append(f"  matched    {host_why}; {prefix_why}")
    sent = without_prefix(request.target, request.path, request.query, route.path) \
        if route.strip_prefix and route.path != "/" else request.target
    if request.target != environ["RAW_URI"]:
        out.append(f"  canonical  {environ['RAW_URI']} -> {request.target}")
    out.append(f"  forwards   {request.method} {sent}" + ("  (strip_prefix)" if sent != request.target else ""))
    host = {"client": request.headers.get("Host", "(none)"), "upstream": "the server's host:port"}
    out.append(f"  Host       {host.get(route.host_header, route.host_header)}")
    chain = [kind if section.name == kind else f"{kind}:{section.name}"
             for kind, section in config.chain_for(route)]
    out.append(f"chain        {' -> '.join([*chain, 'forward'])}")
    for kind, section in config.chain_for(route):
        if kind == "filter":
            path_filter = PathFilter(section)
            why = path_filter.verdict(request.path)
            label = "filter" if section.name == "filter" else f"filter:{section.name}"
            if why is not None:
                out.append(f"answer       {path_filter.status}: refused by [{label}] {why} "
                           f"(judged as {canonical(request.path, path_filter.case_insensitive)}); "
                           "nothing is forwarded")
                return 1, "\n".join(out)
            out.append(f"  filter     passes [{label}]")
        elif kind == "cache":
            # GET and HEAD are looked up under it; other methods invalidate it.
            out.append(f"  cache key  {cache_key(request)}")
    if request.method == "TRACE" and not route.allow_trace:
        out.append("answer       405: TRACE is not allowed by the route (allow_trace = no)")
        return 1, "\n".join(out)
    upstream_config = config.upstreams[route.upstream]
    upstream = Upstream(upstream_config)
    try:
        out.append(f"upstream     {upstream.name}: {len(upstream.servers)} server(s), "
                   f"balance = {upstream_config.balance}")
        server = upstream.pick(request)
        assert server is not None  # a fresh upstream's servers are all available
        policy = upstream_config.balance
        if policy in ("hash", "ip_hash"):
            key_name = upstream_config.hash_key if policy == "hash" else "ip"
            why = f"consistent hash of {key_name} = {upstream.hash_key(request)!r}"
        elif policy == "round_robin":
            why = "the first turn of a fresh worker; servers take turns by weight"
        else:
            why = "with no load; under load the choice follows requests in flight"
        out.append(f"  server     {server.address}  weight {server.weight}  ({why})")
        out.append(f"  timeouts   connect {_seconds(route.connect_timeout or upstream_config.connect_timeout)}, "
                   f"read {_seconds(route.read_timeout or upstream_config.read_timeout)}; "
                   f"retries {upstream_config.retries} within {_seconds(upstream_config.retry_timeout)}")
        if request.upgrade is not None:
            allowed = request.upgrade.lower() in route.upgrade
            out.append(f"  upgrade    {request.upgrade}: " + (
                f"tunnelled (idle_timeout {_seconds(route.idle_timeout)})" if allowed
                else f"not allowed by the route (upgrade = {' '.join(route.upgrade)}); sent as a plain request"))
    finally:
        upstream.close()
    return 0, "\n".join(out)
