"""Read and validate the INI file into frozen dataclasses.

Every setting is declared once, as a dataclass field with its parser and its
documentation; the loader, `rproxy check` and the docs all work from those
declarations. Every error names the file, the section, the key and what is
wrong, with a did-you-mean for misspelt sections and keys.
"""

from __future__ import annotations

import configparser
import difflib
import os
import ssl
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Mapping

from rproxy import values
from rproxy.middleware import MIDDLEWARE
from rproxy.tls import certificates
from rproxy.values import setting

DEFAULT_PATH = "conf/rproxy.ini"

# Sections PasteDeploy and logging.config read from the same file
# (`gunicorn --paste conf/rproxy.ini`); they belong to those tools, not to us.
FOREIGN_SECTION_PREFIXES = ("app:", "server:", "pipeline:", "composite:",
                            "logger_", "handler_", "formatter_")
FOREIGN_SECTIONS = {"DEFAULT", "loggers", "handlers", "formatters"}


class ConfigError(Exception):
    """A config problem, located as precisely as it can be."""

    def __init__(self, path: str, section: str | None, key: str | None, problem: str):
        self.path, self.section, self.key, self.problem = path, section, key, problem
        where = path
        if section:
            where += f": [{section}]"
        if key:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


def _server_header(raw: str) -> str:
    """[server] server_header: the value to send, "" for none."""
    value = values.header_value(raw)
    return "" if value.lower() == "off" else value


@dataclass(frozen=True)
class ServerConfig:
    bind: tuple[str, ...] = setting("127.0.0.1:8080", values.bind_addresses,
                                    "Addresses to listen on, gunicorn syntax (host:port, [::1]:port, "
                                    "unix:/path, fd://N), space separated.")
    workers: int = setting("1", values.positive_count, "Worker processes.")
    worker_connections: int = setting("10000", values.positive_count,
                                      "Concurrent client connections per worker (idle ones cost "
                                      "about 14 KiB each).")
    keepalive: float = setting("5s", values.duration,
                               "How long a keep-alive connection waits for the client's next "
                               "request (its whole head); 0 = one request per connection.")
    client_header_timeout: float = setting("10s", values.positive_duration,
                                           "Time a new connection has to send its first request "
                                           "head; then 408 and closed (slowloris).")
    client_timeout: float = setting("30s", values.positive_duration,
                                    "Once a request head is in: the longest wait for the client's "
                                    "next body bytes (then 408) or for it to take response bytes "
                                    "(then closed, the upstream connection freed).")
    min_body_rate: int = setting("1k", values.size,
                                 "Slowest a request body may arrive, in bytes per second: each 64 KiB "
                                 "of it may take client_timeout plus 64 KiB at this rate; then 408 "
                                 "(slow-body attacks). 0 = only client_timeout applies.")
    max_request_line: int = setting("8k", values.between(values.size, 256, 8192, " bytes"),
                                    "Longest request line (method, target, version), at most 8k; 414 above it.")
    max_headers: int = setting("100", values.between(values.count, 1, 32768),
                               "Most request header fields; 431 above it.")
    max_header_size: int = setting("8k", values.between(values.size, 256, 65536, " bytes"),
                                   "Longest request header field (name and value); 431 above it.")
    max_connections_per_ip: int = setting("0", values.count,
                                          "Concurrent connections one client address may hold; 429 "
                                          "and closed beyond it. Behind trusted_proxies, concurrent "
                                          "requests per forwarded client address. 0 = no limit.")
    graceful_timeout: float = setting("30s", values.positive_duration,
                                      "On shutdown or reload, how long workers may finish their requests.")
    trusted_proxies: tuple = setting("127.0.0.1 ::1", values.networks,
                                     "Peers whose X-Forwarded-*, X-Real-IP, Forwarded and "
                                     "spoofable_headers are believed.")
    spoofable_headers: tuple = setting(
        "X-Client-IP True-Client-IP CF-Connecting-IP Fastly-Client-IP X-Cluster-Client-IP "
        "X-Originating-IP X-Remote-IP X-Remote-Addr Client-IP X-ProxyUser-IP X-Envoy-External-Address "
        "X-Original-Forwarded-For Forwarded-For X-Forwarded X-Original-URL X-Rewrite-URL X-Original-Host "
        "X-Host Front-End-Https X-Url-Scheme X-Client-Cert X-SSL-Client-Cert",
        values.header_names,
        "Request headers only a proxy in front should set (the client's address, scheme, host, "
        "URL or certificate), removed from requests of peers outside trusted_proxies; any case "
        "or spelling with underscores is the same name. X-Forwarded-*, Forwarded and X-Real-IP "
        "are replaced for such peers whatever this lists. Empty = only those.")
    max_body_size: int = setting("100m", values.size,
                                 "Largest request body; 413 above it. 0 = no limit.")
    max_tunnels: int = setting("5000", values.positive_count,
                               "Open WebSocket/upgrade tunnels per worker (two file descriptors "
                               "each); 503 beyond it.")
    certfile: str | None = setting(None, values.readable_file,
                                   "TLS certificate chain (PEM, leaf first): the bind addresses serve "
                                   "HTTPS. Needs keyfile. Also the certificate for clients whose SNI "
                                   "matches no other.")
    keyfile: str | None = setting(None, values.readable_file, "TLS private key (PEM) for certfile.")
    http2: bool = setting("no", values.boolean,
                          "Offer HTTP/2 to TLS clients (ALPN: h2, then http/1.1). Needs certfile, "
                          "or http2_cleartext.")
    http2_cleartext: bool = setting("no", values.boolean,
                                    "Without TLS: serve HTTP/2 to peers in trusted_proxies that start with "
                                    "the HTTP/2 preface (prior knowledge) or ask for Upgrade: h2c; "
                                    "HTTP/1.1 is still served. Needs http2 = yes.")
    http2_max_concurrent_streams: int = setting("32", values.positive_count,
                                                "Requests one HTTP/2 connection may have in flight (advertised "
                                                "to the client); each is served on its own and holds at most "
                                                "one upstream connection, so this also bounds what one client "
                                                "connection holds upstream.")
    http_bind: tuple[str, ...] = setting("", values.listeners,
                                         "Plain-HTTP listeners beside the HTTPS ones, e.g. 0.0.0.0:80; "
                                         "only with TLS.")
    redirect_http: bool = setting("yes", values.boolean,
                                  "On http_bind listeners, answer 308 with the https:// URL (ACME "
                                  "challenges excepted); no = serve plain HTTP there too.")
    https_port: int | None = setting(None, values.port,
                                     "The port redirects to HTTPS name; default: that of the first bind "
                                     "address (left out when 443).")
    tls_min_version: str = setting("1.2", values.one_of("1.2", "1.3"), "Oldest TLS version accepted.")
    pidfile: str = setting("", values.text,
                           "The master's pid file (`rproxy reload`/`rproxy stop` read it); empty = "
                           "NAME.pid in /run/rproxy (root) or /tmp/rproxy-UID, NAME from the config "
                           "file's name and real path (`rproxy check` prints it).")
    control_socket: str = setting("", values.text,
                                  "gunicorn's control socket (`gunicornc -s PATH`); empty = NAME.ctl "
                                  "beside the default pid file, never shared with another instance; "
                                  "off = none.")
    server_header: str = setting("rproxy", _server_header,
                                 "The Server header of every response, over HTTP/1.1 and HTTP/2, the "
                                 "proxy's own answers included (the upstream's is never passed on); "
                                 "off = none.")
    preserve_header_case: bool = setting("no", values.boolean,
                                         "Send request header names upstream spelled as the HTTP/1.x "
                                         "client sent them (x-api-key, not X-Api-Key), for upstreams that "
                                         "depend on it. HTTP/2 clients send lower-case names, which go "
                                         "upstream as X-Api-Key as ever. Response header names reach "
                                         "HTTP/1.x clients as the upstream spelled them, either way.")


@dataclass(frozen=True)
class AdminConfig:
    bind: str = setting("", values.text,
                        "host:port of the admin listener (/metrics, /status); empty = none. Never "
                        "reachable through a route.")
    metrics_dir: str = setting("", values.text,
                               "Where workers keep their metric values; default: a fresh temporary folder.")


@dataclass(frozen=True)
class LogConfig:
    access_log: str = setting("-", values.text, "Access log file; '-' is stdout, 'off' disables it.")
    format: str = setting("combined", values.one_of("combined", "json"),
                          "Access log lines: combined (with upstream, timing, request id) or json.")
    error_log: str = setting("-", values.text, "Error log file; '-' is stderr.")
    level: str = setting("info", values.one_of("debug", "info", "warning", "error", "critical"),
                         "Error log level.")


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    servers: tuple[values.ServerAddress, ...] = setting(None, values.servers,
                                                        "host:port or http(s)://host:port, each optionally followed by weight=N.",
                                                        required=True)
    balance: str = setting("round_robin", values.one_of("round_robin", "least_conn", "ip_hash", "hash",
                                                        "random"),
                           "How a server is chosen: round_robin (by weight), least_conn (fewest in "
                           "flight), ip_hash or hash (consistent, by hash_key), random (two choices).")
    hash_key: str = setting("ip", values.hash_key,
                            "What balance = hash hashes: ip (the client's), path, or header:NAME.")
    connect_timeout: float = setting("3s", values.positive_duration, "Time to open a connection to a server.")
    read_timeout: float = setting("30s", values.positive_duration,
                                  "Longest wait for any byte of a response, including its head.")
    pool_size: int = setting("64", values.positive_count,
                             "Idle keep-alive connections kept per server and worker.")
    max_connections: int = setting("1024", values.count,
                                   "Cap on open connections per server and worker; requests beyond it wait, in "
                                   "order, up to connect_timeout, then get 503. Each request or response in "
                                   "flight holds one (an event stream or long poll for its whole life: raise "
                                   "it for many of those). 0 = no cap.")
    max_fails: int = setting("1", values.count,
                             "Failures (connect error, timeout, fail_status) within fail_timeout that "
                             "take a server out for fail_timeout; 0 = never.")
    fail_timeout: float = setting("10s", values.positive_duration,
                                  "The window for max_fails, and how long a failing server stays out; "
                                  "then one request tries it again.")
    fail_status: frozenset = setting("", values.statuses,
                                     "Response statuses that count as failures, e.g. 502-504 (the "
                                     "response is still relayed).")
    health_check: tuple | None = setting("", values.health_check,
                                         "Active health check, e.g. GET /healthz; empty = none.")
    health_interval: float = setting("5s", values.positive_duration, "Time between health checks.")
    health_timeout: float = setting("2s", values.positive_duration, "Time a health check may take.")
    health_status: frozenset = setting("200-399", values.statuses,
                                       "Statuses a passing health check answers with.")
    retries: int = setting("1", values.count,
                           "Further servers to try when one cannot be reached, or (idempotent "
                           "requests without a body) sent no response head.")
    retry_timeout: float = setting("10s", values.positive_duration,
                                   "No retry starts later than this after the first attempt.")
    ca_file: str | None = setting(None, values.readable_file,
                                  "CA certificates (PEM) that https:// servers are verified against; "
                                  "default: the system's.")
    tls_verify: bool = setting("yes", values.boolean,
                               "Verify https:// servers: their certificate chain (ca_file or the "
                               "system's CAs) and their name. no accepts any certificate, with a "
                               "warning at start.")
    tls_name: str = setting("", values.host_name,
                            "Name sent as SNI and checked against https:// servers' certificates "
                            "(like nginx's proxy_ssl_name); empty = the host written in servers.")
    client_certfile: str | None = setting(None, values.readable_file,
                                          "Client certificate chain (PEM) presented to https:// "
                                          "servers that ask for one (mutual TLS).")
    client_keyfile: str | None = setting(None, values.readable_file,
                                         "Private key (PEM) of client_certfile, unless that file "
                                         "holds it too.")


@dataclass(frozen=True)
class RouteConfig:
    name: str
    upstream: str = setting(None, values.text, "The [upstream:NAME] this route forwards to.", required=True)
    path: str = setting("/", values.path_prefix,
                        "Path prefix, matched by whole segments; the longest match wins.")
    host: tuple[str, ...] = setting("", values.host_patterns,
                                    "Host names this route answers (exact or *.example.com); empty = any.")
    strip_prefix: bool = setting("no", values.boolean,
                                 "Remove the matched path prefix before forwarding.")
    host_header: str = setting("client", values.text,
                               "Host sent upstream: 'client' (as received), 'upstream' (the server's "
                               "host:port) or a literal value.")
    upgrade: tuple[str, ...] = setting("websocket", values.lower_words,
                                       "Upgrade protocols tunnelled to the upstream (e.g. websocket); "
                                       "others are forwarded as plain requests, without the upgrade.")
    idle_timeout: float = setting("5m", values.positive_duration,
                                  "A tunnel with no traffic either way for this long is closed.")
    rate_limit: str = setting("", values.section_choice,
                              "[rate_limit:NAME] for this route, or off; empty = the global [rate_limit].")
    filter: str = setting("", values.section_choice,
                          "[filter:NAME] for this route, or off; empty = the global [filter].")
    security_headers: str = setting("", values.section_choice,
                                    "[security_headers:NAME] for this route, or off; empty = the global one.")
    cache: str = setting("", values.section_choice,
                         "[cache:NAME] for this route, or off; empty = the global [cache].")
    server_timing: bool = setting("no", values.boolean,
                                  "Add a Server-Timing header: time in the proxy, waiting for the "
                                  "upstream, and the cache's verdict.")
    connect_timeout: float | None = setting(None, values.positive_duration,
                                            "Overrides the upstream's connect_timeout for this route.")
    read_timeout: float | None = setting(None, values.positive_duration,
                                         "Overrides the upstream's read_timeout for this route.")
    allow_trace: bool = setting("no", values.boolean,
                                "Forward TRACE requests; refused with 405 otherwise (TRACE echoes a "
                                "request, its cookies too, back to whoever sent it).")


@dataclass(frozen=True)
class CertificateConfig:
    name: str
    certfile: str = setting(None, values.readable_file,
                            "Certificate chain (PEM, leaf first), served to clients whose SNI matches "
                            "one of its names (subjectAltName, wildcards included).", required=True)
    keyfile: str = setting(None, values.readable_file, "Its private key (PEM).", required=True)


ACME_CHALLENGES = ("tls-alpn-01", "http-01", "dns-01")
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1", "hmac-md5")


def _acme_challenges(raw: str) -> tuple[str, ...]:
    """ACME challenge types, in order of preference, each once."""
    names = values.lower_words(raw)
    for name in names:
        if name not in ACME_CHALLENGES:
            raise ValueError(f"{name!r} is not one of: {', '.join(ACME_CHALLENGES)}")
    if len(set(names)) != len(names):
        raise ValueError("names a challenge type twice")
    if not names:
        raise ValueError("names no challenge type")
    return names


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True)
class AcmeConfig:
    domains: tuple[str, ...] = setting(None, values.domain_names,
                                       "Domains to obtain certificates for (one each); a wildcard "
                                       "(*.example.com) needs dns-01.", required=True)
    challenges: tuple[str, ...] = setting("tls-alpn-01 http-01", _acme_challenges,
                                          "Challenge types in order of preference: the first one the CA "
                                          "offers that the listeners allow is used. tls-alpn-01: on the "
                                          "TLS port (bind, 443 as the CA sees it); http-01: on http_bind "
                                          "(port 80 as the CA sees it); dns-01: a TXT record published by dns_provider "
                                          "(the only one for wildcards).")
    email: str = setting("", values.text, "Contact address given to the CA (expiry notices); empty = none.")
    directory: str = setting(LETS_ENCRYPT, values.url,
                             "The CA's ACME directory URL; Let's Encrypt's staging one is "
                             "https://acme-staging-v02.api.letsencrypt.org/directory.")
    cache_dir: str = setting(None, values.text,
                             "Where the account key and certificates are kept (mode 0700, keys 0600).",
                             required=True)
    storage: str = setting("", values.acme_storage_uri,
                           "A fleet's shared store: redis://host:port/db (or rediss://, redis+sentinel://, "
                           "redis+cluster://) keeps the account, the certificates, the issuance lock and "
                           "pending challenge answers there, so that one instance orders and every instance "
                           "serves and answers challenges; each mirrors it into its cache_dir. Empty: "
                           "cache_dir alone.")
    renew_before: float = setting("30d", values.positive_duration,
                                  "Renew this long before expiry (a third of the lifetime for certificates "
                                  "that live less than this).")
    retry_interval: float = setting("2m", values.positive_duration,
                                    "Wait after a failed attempt; it doubles with each further failure, "
                                    "up to 12h.")
    ca_file: str | None = setting(None, values.readable_file,
                                  "CA certificates (PEM) the directory's HTTPS is verified against; "
                                  "default: the system's.")
    dns_provider: str | None = setting(None, values.one_of("rfc2136", "exec"),
                                "How dns-01 publishes its TXT records: rfc2136 (dynamic updates signed "
                                "with a TSIG key) or exec (dns_exec). Required by dns-01.")
    dns_server: tuple[str, int] | None = setting(None, values.ip_port,
                                                 "rfc2136: the primary server taking the updates (IP[:port], "
                                                 "port 53 by default); both providers then wait for the record "
                                                 "there, else at the zone's NS.")
    dns_zone: str = setting("", values.dns_name,
                            "rfc2136: the zone to update; default: found by asking dns_server for the SOA.")
    dns_tsig_key_name: str = setting("", values.dns_name,
                                     "rfc2136: the name of the TSIG key allowed to update the zone.")
    dns_tsig_algorithm: str = setting("hmac-sha256", values.one_of(*TSIG_ALGORITHMS),
                                      "rfc2136: the TSIG key's algorithm.")
    dns_tsig_secret: str = setting("", values.base64_secret,
                                   "rfc2136: the TSIG key's secret (base64); keep it out of the file with "
                                   "${NAME}.")
    dns_exec: str | None = setting(None, values.executable_file,
                                   "exec: a program run as `PROGRAM present|cleanup DOMAIN TXT_NAME VALUE`; "
                                   "exit status 0 is success.")
    dns_propagation_timeout: float = setting("120s", values.positive_duration,
                                             "dns-01: how long to wait for the authoritative servers to answer "
                                             "the TXT record (asked every second) before giving up the attempt.")


SINGLE_SECTIONS: dict[str, type] = {"server": ServerConfig, "log": LogConfig, "admin": AdminConfig,
                                    "acme": AcmeConfig}
NAMED_SECTIONS: dict[str, type] = {"upstream": UpstreamConfig, "route": RouteConfig,
                                   "certificate": CertificateConfig}


@dataclass(frozen=True)
class Config:
    path: str
    server: ServerConfig
    log: LogConfig
    admin: AdminConfig
    upstreams: Mapping[str, UpstreamConfig]
    routes: tuple[RouteConfig, ...]
    certificates: Mapping[str, CertificateConfig]
    acme: AcmeConfig
    # kind -> {"": the global section, NAME: [kind:NAME]}
    middleware: Mapping[str, Mapping[str, Any]]

    @property
    def tls(self) -> bool:
        """Do the bind addresses serve HTTPS?"""
        return bool(self.server.certfile or self.certificates or self.acme.domains)

    def chain_for(self, route: RouteConfig) -> list[tuple[str, Any]]:
        """The middleware configs a route runs, in chain order."""
        chain = []
        for kind in MIDDLEWARE:
            choice = getattr(route, kind)
            if choice != "off":
                section = self.middleware[kind].get(choice)
                if section is not None:
                    chain.append((kind, section))
        return chain


def load(path: str) -> Config:
    """Read and validate `path`; raise ConfigError on the first problem."""
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";",),
        empty_lines_in_values=False,
        # [DEFAULT] is PasteDeploy's; keep its keys out of our sections.
        default_section="\x00none",
    )
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror or e}") from None
    except configparser.Error as e:
        raise ConfigError(path, None, None, _parser_problem(e)) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "is not UTF-8 text") from None

    singles: dict[str, Any] = {}
    named: dict[str, dict[str, Any]] = {kind: {} for kind in NAMED_SECTIONS}
    middleware: dict[str, dict[str, Any]] = {kind: {} for kind in MIDDLEWARE}
    for section in parser.sections():
        if section in FOREIGN_SECTIONS or section.startswith(FOREIGN_SECTION_PREFIXES):
            continue
        kind, _, name = section.partition(":")
        kind = kind.strip()
        if kind in MIDDLEWARE:
            name = name.strip()
            if section.endswith(":") or (name and name == "off"):
                raise ConfigError(path, section, None, f"needs a name, like [{kind}:NAME], or none")
            middleware[kind][name] = _build(path, section, MIDDLEWARE[kind], parser[section],
                                            {"name": name or kind})
        elif kind in SINGLE_SECTIONS and not name:
            singles[kind] = _build(path, section, SINGLE_SECTIONS[kind], parser[section], {})
        elif kind in NAMED_SECTIONS and name.strip():
            name = name.strip()
            named[kind][name] = _build(path, section, NAMED_SECTIONS[kind], parser[section], {"name": name})
        elif kind in NAMED_SECTIONS:
            raise ConfigError(path, section, None, f"needs a name, like [{kind}:NAME]")
        else:
            hint = _did_you_mean(kind, [*SINGLE_SECTIONS, *NAMED_SECTIONS, *MIDDLEWARE])
            raise ConfigError(path, section, None, "unknown section" + hint)

    config = Config(
        path=path,
        server=singles.get("server", ServerConfig()),
        log=singles.get("log", LogConfig()),
        admin=singles.get("admin", AdminConfig()),
        upstreams=MappingProxyType(named["upstream"]),
        routes=tuple(named["route"].values()),
        certificates=MappingProxyType(named["certificate"]),
        acme=singles.get("acme", AcmeConfig()),
        middleware=MappingProxyType({k: MappingProxyType(v) for k, v in middleware.items()}),
    )
    _check_references(config)
    for upstream in config.upstreams.values():
        _check_upstream_tls(path, upstream)
    if config.admin.bind:
        try:
            values.host_port(config.admin.bind)
        except ValueError as e:
            raise ConfigError(path, "admin", "bind", str(e)) from None
        if config.admin.bind in config.server.bind:
            raise ConfigError(path, "admin", "bind", "must differ from every [server] bind address")
    if config.server.http2_cleartext and not config.server.http2:
        raise ConfigError(path, "server", "http2_cleartext", "needs http2 = yes")
    if config.server.http2_cleartext and config.server.certfile:
        raise ConfigError(path, "server", "http2_cleartext",
                          "does not apply with certfile: TLS clients choose HTTP/2 by ALPN")
    if bool(config.server.certfile) != bool(config.server.keyfile):
        raise ConfigError(path, "server", "keyfile" if config.server.certfile else "certfile",
                          "is required when the other of certfile/keyfile is set")
    _check_tls(config)
    return config


def _check_tls(config: Config) -> None:
    path, server = config.path, config.server
    pairs = [("server", server.certfile, server.keyfile)]
    pairs += [(f"certificate:{name}", c.certfile, c.keyfile) for name, c in config.certificates.items()]
    for section, certfile, keyfile in pairs:
        if certfile:
            try:
                certificates.check_pair(certfile, keyfile)
            except certificates.CertificateProblem as e:
                raise ConfigError(path, section, e.key, str(e)) from None
    if server.http_bind and not config.tls:
        raise ConfigError(path, "server", "http_bind",
                          "needs TLS (certfile, a [certificate:NAME] or [acme]): without it bind is plain HTTP")
    tls_keys = {values.listener_key(bind) for bind in server.bind}
    for bind in server.http_bind:
        if values.listener_key(bind) in tls_keys:
            raise ConfigError(path, "server", "http_bind", f"{bind!r} has the port or path of a bind address")
    if config.acme.domains:
        if config.acme.challenges == ("http-01",) and not server.http_bind:
            raise ConfigError(path, "acme", "challenges", "http-01 validation needs a plain-HTTP listener: "
                                                          "set [server] http_bind (port 80 as the CA sees it), "
                                                          "or add tls-alpn-01")
        problem = _not_writable(config.acme.cache_dir)
        if problem:
            raise ConfigError(path, "acme", "cache_dir", problem)
        _check_dns01(path, config.acme)


def _check_dns01(path: str, acme: AcmeConfig) -> None:
    """The keys dns-01 needs, and dns-01 for wildcards (only it can prove one, RFC 8555 §7.1.3)."""
    if "dns-01" not in acme.challenges:
        wildcard = next((d for d in acme.domains if d.startswith("*.")), None)
        if wildcard:
            raise ConfigError(path, "acme", "domains", f"{wildcard!r}: a wildcard can only be validated by "
                                                       "dns-01: add it to [acme] challenges")
        if acme.dns_provider:
            raise ConfigError(path, "acme", "dns_provider", "is set, but [acme] challenges does not name dns-01")
        return
    needed = {"": ("dns_provider",), "rfc2136": ("dns_server", "dns_tsig_key_name", "dns_tsig_secret"),
              "exec": ("dns_exec",)}[acme.dns_provider or ""]
    for key in needed:
        if not getattr(acme, key):
            why = "dns-01 needs it" if key == "dns_provider" else f"dns_provider = {acme.dns_provider} needs it"
            raise ConfigError(path, "acme", key, f"is required: {why}")


def _not_writable(directory: str) -> str | None:
    """Why rproxy could not keep files in `directory` (creating it), or None."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe!r} is not writable"
    return None


def _build(path: str, section: str, cls: type, items: Mapping[str, str], preset: dict[str, Any]):
    declared = {f.name: f for f in fields(cls) if "parse" in f.metadata}
    kwargs = dict(preset)
    for key, raw in items.items():
        spec = declared.get(key)
        if spec is None:
            raise ConfigError(path, section, key, "unknown key" + _did_you_mean(key, declared))
        try:
            kwargs[key] = spec.metadata["parse"](values.substitute(raw, os.environ))
        except ValueError as e:
            raise ConfigError(path, section, key, values.masked(str(e), raw, os.environ)) from None
    for key, spec in declared.items():
        if spec.metadata["required"] and not kwargs.get(key):
            raise ConfigError(path, section, key, f"is required: {spec.metadata['doc']}")
    return cls(**kwargs)


def _check_references(config: Config) -> None:
    if not config.routes:
        raise ConfigError(config.path, None, None,
                          "has no [route:NAME] section, so every request would get 404")
    seen: dict[tuple, str] = {}
    for route in config.routes:
        section = f"route:{route.name}"
        if route.upstream not in config.upstreams:
            raise ConfigError(config.path, section, "upstream",
                              f"no [upstream:{route.upstream}] section"
                              + _did_you_mean(route.upstream, config.upstreams))
        for kind in MIDDLEWARE:
            choice = getattr(route, kind)
            if choice not in ("", "off") and choice not in config.middleware[kind]:
                named_ones = [n for n in config.middleware[kind] if n]
                raise ConfigError(config.path, section, kind, f"no [{kind}:{choice}] section"
                                  + _did_you_mean(choice, named_ones))
        for host in route.host or ("",):
            other = seen.setdefault((host, route.path), route.name)
            if other != route.name:
                raise ConfigError(config.path, section, "path",
                                  f"{route.path!r}{' for host ' + host if host else ''} "
                                  f"is already routed by [route:{other}]")


def _check_upstream_tls(path: str, upstream: UpstreamConfig) -> None:
    """Load the upstream's TLS files now, so that a wrong key or a file that
    holds no certificate is a config error rather than a 502 per request."""
    section = f"upstream:{upstream.name}"
    if upstream.client_keyfile and not upstream.client_certfile:
        raise ConfigError(path, section, "client_keyfile", "needs client_certfile")
    if not any(s.scheme == "https" for s in upstream.servers):
        return
    if upstream.ca_file:
        try:
            ssl.create_default_context(cafile=upstream.ca_file)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(path, section, "ca_file", f"holds no usable CA certificate: {e}") from None
    if upstream.client_certfile:
        try:
            ssl.create_default_context().load_cert_chain(upstream.client_certfile, upstream.client_keyfile)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(path, section, "client_certfile",
                              f"is not a certificate chain with its private key: {e}") from None


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parser_problem(error: configparser.Error) -> str:
    if isinstance(error, configparser.DuplicateSectionError):
        return f"line {error.lineno}: section [{error.section}] appears twice"
    if isinstance(error, configparser.DuplicateOptionError):
        return f"line {error.lineno}: [{error.section}] {error.option} is set twice"
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: a key before any [section] header"
    if isinstance(error, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in error.errors)
        return f"line {lines}: not 'key = value', a [section] or a comment"
    return str(error)


def reference() -> str:
    """The config reference, in Markdown, from the declarations above."""
    out = []
    headers = {**{k: f"[{k}]" for k in SINGLE_SECTIONS}, **{k: f"[{k}:NAME]" for k in NAMED_SECTIONS},
               **{k: f"[{k}] or [{k}:NAME]" for k in MIDDLEWARE}}
    for kind, cls in [*SINGLE_SECTIONS.items(), *NAMED_SECTIONS.items(), *MIDDLEWARE.items()]:
        header = headers[kind]
        out += [f"#### `{header}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in fields(cls):
            if "parse" in f.metadata:
                meta = f.metadata
                shown = ("(required)" if meta["required"] else "(unset)" if meta["raw"] is None
                         else f"`{meta['raw']}`" if meta["raw"] else "(empty)")
                out.append(f"| `{f.name}` | {shown} | {meta['doc']} |")
        out.append("")
    return "\n".join(out)


def config_path() -> str:
    """The INI this process serves: $RPROXY_CONFIG, else conf/rproxy.ini."""
    return os.environ.get("RPROXY_CONFIG") or DEFAULT_PATH
