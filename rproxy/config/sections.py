"""The sections of the INI, one frozen dataclass each.

Every setting is a field declared with `setting(raw, parser, doc)`: its
parser (rproxy/values.py) and its documentation in one place, which the
loader (config/__init__.py), `rproxy check` and `rproxy reference` read.
"""

from __future__ import annotations

from dataclasses import dataclass

from rproxy import values
from rproxy.config import addresses
from rproxy.values import setting


def _server_header(raw: str) -> str:
    """[server] server_header: the value to send, "" for none."""
    value = values.header_value(raw)
    return "" if value.lower() == "off" else value


@dataclass(frozen=True)
class ServerConfig:
    bind: tuple[str, ...] = setting("127.0.0.1:8080", addresses.bind_addresses,
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
    trusted_proxies: tuple = setting("127.0.0.1 ::1", addresses.networks,
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
    http_bind: tuple[str, ...] = setting("", addresses.listeners,
                                         "Plain-HTTP listeners beside the HTTPS ones, e.g. 0.0.0.0:80; "
                                         "only with TLS.")
    redirect_http: bool = setting("yes", values.boolean,
                                  "On http_bind listeners, answer 308 with the https:// URL (ACME "
                                  "challenges excepted); no = serve plain HTTP there too.")
    https_port: int | None = setting(None, addresses.port,
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
    servers: tuple[addresses.ServerAddress, ...] = setting(None, addresses.servers,
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
    health_check: tuple[str, str] | None = setting("", values.health_check,
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
    tls_name: str = setting("", addresses.host_name,
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
    host: tuple[str, ...] = setting("", addresses.host_patterns,
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
    domains: tuple[str, ...] = setting(None, addresses.domain_names,
                                       "Domains to obtain certificates for (one each); a wildcard "
                                       "(*.example.com) needs dns-01.", required=True)
    challenges: tuple[str, ...] = setting("tls-alpn-01 http-01", _acme_challenges,
                                          "Challenge types in order of preference: the first one the CA "
                                          "offers that the listeners allow is used. tls-alpn-01: on the "
                                          "TLS port (bind, 443 as the CA sees it); http-01: on http_bind "
                                          "(port 80 as the CA sees it); dns-01: a TXT record published by dns_provider "
                                          "(the only one for wildcards).")
    email: str = setting("", values.text, "Contact address given to the CA (expiry notices); empty = none.")
    directory: str = setting(LETS_ENCRYPT, addresses.url,
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
    dns_server: tuple[str, int] | None = setting(None, addresses.ip_port,
                                                 "rfc2136: the primary server taking the updates (IP[:port], "
                                                 "port 53 by default); both providers then wait for the record "
                                                 "there, else at the zone's NS.")
    dns_zone: str = setting("", addresses.dns_name,
                            "rfc2136: the zone to update; default: found by asking dns_server for the SOA.")
    dns_tsig_key_name: str = setting("", addresses.dns_name,
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
