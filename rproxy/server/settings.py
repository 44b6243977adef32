"""gunicorn's settings, taken from the same INI that configures the proxy.

`gunicorn.conf.py` calls `gunicorn_settings()`; gunicorn applies its own
command-line flags on top, so those still override. A bad config stops
gunicorn here, in the master, with the same message `rproxy check` prints.
The hooks that run in the master are here too, among them what keeps a
signal sent during start-up from being lost (see _MASTER_COMMANDS and
worker.hold_signals_across_fork).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import resource
import signal
import sys
from typing import TYPE_CHECKING, Any

from rproxy import config as config_module
from rproxy import instance
from rproxy.config import Config, ConfigError
from rproxy.observability import metrics
from rproxy.server import listeners
from rproxy.tls import acme, acme_cache, certificates

if TYPE_CHECKING:
    # Not at run time: paste.py tells a gunicorn worker by its modules being loaded.
    from gunicorn import glogging
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

# Certificates from files closer to expiry than this get a warning at start.
EXPIRY_WARNING = datetime.timedelta(days=14)


def ini_path(conf_dir: str, argv: list[str]) -> str:
    """The INI to serve: `--paste FILE` when given (legacy paste deployments),
    else $RPROXY_CONFIG, else conf/rproxy.ini beside gunicorn.conf.py."""
    for i, arg in enumerate(argv):
        if arg in ("--paste", "--paster") and i + 1 < len(argv):
            return argv[i + 1].split("#")[0]
        if arg.startswith(("--paste=", "--paster=")):
            return arg.split("=", 1)[1].split("#")[0]
    return os.environ.get("RPROXY_CONFIG") or os.path.join(conf_dir, config_module.DEFAULT_PATH)


def to_gunicorn(config: Config) -> dict[str, Any]:
    server, log = config.server, config.log
    return {
        "wsgi_app": "rproxy.app:application",
        # gevent's worker, guarding client connections and serving the streams
        # of an HTTP/2 connection side by side.
        "worker_class": "rproxy.server.worker.Worker",
        "bind": [*server.bind, *server.http_bind, *([config.admin.bind] if config.admin.bind else [])],
        "workers": server.workers,
        "worker_connections": server.worker_connections,
        "keepalive": math.ceil(server.keepalive),
        "limit_request_line": server.max_request_line,
        "limit_request_fields": server.max_headers,
        "limit_request_field_size": server.max_header_size,
        "graceful_timeout": math.ceil(server.graceful_timeout),
        # gunicorn's own trust (wsgi.url_scheme from X-Forwarded-Proto) follows ours.
        "forwarded_allow_ips": ",".join(str(net) for net in server.trusted_proxies),
        "accesslog": None if log.access_log == "off" else log.access_log,
        "errorlog": log.error_log,
        "loglevel": log.level,
        "logger_class": "rproxy.server.accesslog."
                        + ("JsonAccessLogger" if log.format == "json" else "AccessLogger"),
        "proc_name": "rproxy",
        # gunicorn turns TLS on when certfile is set; our ssl_context hook then
        # chooses the certificate per connection, and leaves plain listeners plain.
        "certfile": default_certificate(config),
        "ssl_context": listeners.ssl_context_hook(config),
        "http_protocols": "h2,h1" if server.http2 else "h1",
        # "both": HTTP/1.1 stays served beside the preface (gunicorn's
        # "prior-knowledge" alone answers HTTP/1.1 from trusted peers with 400).
        "http2_cleartext": "both" if server.http2_cleartext else "off",
        "http2_max_concurrent_streams": server.http2_max_concurrent_streams,
        "when_ready": when_ready,
        "pre_fork": pre_fork,
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "child_exit": child_exit,
        # Files of this instance alone: gunicorn's defaults are one per user.
        "pidfile": instance.pidfile(config),
        **instance.control_socket_settings(config),
    }


def default_certificate(config: Config) -> str | None:
    if not config.tls:
        return None
    if config.server.certfile:
        return config.server.certfile
    for section in config.certificates.values():
        return section.certfile
    return acme_cache.CacheDir(config.acme).placeholder


def child_exit(arbiter: Arbiter, worker: Worker) -> None:
    """In the master: a dead worker's live gauges stop counting."""
    metrics.worker_died(worker.pid)


def when_ready(arbiter: Arbiter) -> None:
    """In the master, once listening: take the commands held since start-up,
    say what is unsafe, which listeners are plain, and what several workers
    change."""
    global _master_held
    # gunicorn's handlers are in place (init_signals comes before): a command
    # sent since the config was read is handled now, by gunicorn's loop.
    held, _master_held = _master_held, frozenset()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    config = _serving
    if config is None:
        return
    for upstream in config.upstreams.values():
        if not upstream.tls_verify and any(s.scheme == "https" for s in upstream.servers):
            arbiter.log.warning("rproxy: [upstream:%s] tls_verify = no: its https:// servers' certificates "
                                "are not verified; anyone on the path can impersonate them", upstream.name)
    if config.tls:
        plain = [*config.server.http_bind, *([config.admin.bind] if config.admin.bind else [])]
        if plain:
            arbiter.log.info("rproxy: plain HTTP (no TLS) on %s%s", " ".join(plain),
                             "; redirects to HTTPS" if config.server.redirect_http and config.server.http_bind
                             else "")
        _warn_expiring(config, arbiter.log)
    if arbiter.cfg.workers < 2:
        return
    local = [f"[rate_limit{'' if name == '' else ':' + name}]"
             for name, section in config.middleware["rate_limit"].items()
             if section.storage == "memory://"]
    if local:
        arbiter.log.warning("rproxy: %s count in memory: with %d workers the limits apply per worker; "
                            "storage = redis://... shares them", ", ".join(local), arbiter.cfg.workers)


def _warn_expiring(config: Config, log: glogging.Logger) -> None:
    """Certificates from files are not renewed by rproxy: say so when one is about to expire."""
    pairs = [("[server] certfile", config.server.certfile)]
    pairs += [(f"[certificate:{name}]", c.certfile) for name, c in config.certificates.items()]
    now = datetime.datetime.now(datetime.timezone.utc)
    for label, path in pairs:
        if not path:
            continue
        try:
            leaf = certificates.load_chain(path)[0]
        except certificates.CertificateProblem:
            continue
        left = leaf.not_valid_after_utc - now
        if left < EXPIRY_WARNING:
            log.warning("rproxy: %s: the certificate in %s expires in %d days (%s UTC)", label, path,
                        left.days, f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M}")


def pre_fork(arbiter: Arbiter, worker: Worker) -> None:
    """In the master, about to fork a worker: signals sent to it while it
    boots wait until it has its handlers."""
    from rproxy.server.worker import hold_signals_across_fork  # the worker class: imported by now
    hold_signals_across_fork(worker)


def post_worker_init(worker: Worker) -> None:
    config = getattr(worker.wsgi, "config", None)
    if config is not None:
        worker.log.info("rproxy worker %s ready: %d routes, %d upstreams", worker.pid,
                        len(config.routes), len(config.upstreams))
        if config.acme.domains:
            acme.start(config, lambda: worker.alive)


def worker_exit(arbiter: Arbiter, worker: Worker) -> None:
    """In the stopping worker, after gunicorn's own requests are done: tunnels
    (which gunicorn no longer tracks) say goodbye before the process ends."""
    shutdown = getattr(worker.wsgi, "shutdown", None)
    if shutdown is not None:
        shutdown()


# Signals that ask a running master to do something (reload, reopen the logs,
# upgrade, one worker more or less) but whose default action ends or stops the
# process: one that comes before gunicorn has its handlers (a tool that starts
# and reloads in one step) waits, blocked, until when_ready. Before this
# module runs, nothing but the default action can take it.
_MASTER_COMMANDS = frozenset({signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU})
_master_held: frozenset[signal.Signals] = frozenset()

# The config this master serves, validated. Workers are forked from the
# master, so they start from it rather than from the file, which may have
# changed (and broken) since.
_serving: Config | None = None
_settings: dict[str, Any] = {}


def serving_config() -> Config | None:
    return _serving


def gunicorn_settings(conf_file: str, argv: list[str] | None = None) -> dict[str, Any]:
    """At start: the settings, or exit with the config's problem. At a reload
    (HUP): the new settings, or, when the file is now broken, the old ones
    kept with an error logged, so that the proxy goes on serving."""
    global _serving, _settings, _master_held
    if _serving is None:  # starting: gunicorn's handlers come after this
        _master_held = _MASTER_COMMANDS - signal.pthread_sigmask(signal.SIG_BLOCK, _MASTER_COMMANDS)
    conf_dir = os.path.dirname(os.path.abspath(conf_file))
    path = os.path.abspath(ini_path(conf_dir, sys.argv if argv is None else argv))
    try:
        config = config_module.load(path)
        if config.acme.domains:
            prepare_acme(config)
        instance.prepare(config)
    except ConfigError as e:
        if _serving is None:
            print(f"rproxy: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        logging.getLogger("gunicorn.error").error(
            "rproxy: reload refused, still serving the config loaded before: %s", e)
        return _settings
    # Workers read the same file if they must: make sure they find it whatever their cwd.
    os.environ["RPROXY_CONFIG"] = path
    raise_open_files_limit()
    if config.admin.bind and _serving is None:
        metrics.prepare_directory(config.admin.metrics_dir or None)
    _serving, _settings = config, to_gunicorn(config)
    return _settings


def prepare_acme(config: Config) -> None:
    try:
        acme_cache.prepare(config)
    except OSError as e:
        raise ConfigError(config.path, "acme", "cache_dir",
                          f"cannot prepare {config.acme.cache_dir!r}: {e.strerror or e}") from None


def raise_open_files_limit() -> None:
    """Each proxied connection takes two descriptors, each tunnel two more:
    take all the kernel allows, like nginx's worker_rlimit_nofile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
