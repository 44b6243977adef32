"""Read and validate the INI file into frozen dataclasses.

Every setting is declared once, as a dataclass field with its parser and its
documentation (config/sections.py); the loader here, `rproxy check` and the
docs all work from those declarations. Every error names the file, the
section, the key and what is wrong, with a did-you-mean for misspelt
sections and keys.
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
from rproxy.config import addresses
from rproxy.config.sections import (
    NAMED_SECTIONS,
    SINGLE_SECTIONS,
    AcmeConfig,
    AdminConfig,
    CertificateConfig,
    LogConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
)
from rproxy.middleware import MIDDLEWARE
from rproxy.tls import certificates

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
            addresses.host_port(config.admin.bind)
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
        if certfile and keyfile:  # one without the other was refused above
            try:
                certificates.check_pair(certfile, keyfile)
            except certificates.CertificateProblem as e:
                raise ConfigError(path, section, e.key, str(e)) from None
    if server.http_bind and not config.tls:
        raise ConfigError(path, "server", "http_bind",
                          "needs TLS (certfile, a [certificate:NAME] or [acme]): without it bind is plain HTTP")
    tls_keys = {addresses.listener_key(bind) for bind in server.bind}
    for bind in server.http_bind:
        if addresses.listener_key(bind) in tls_keys:
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
