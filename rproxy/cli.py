"""rproxy's command line (also `python -m rproxy`).

    rproxy check [CONFIG]   validate a config the way `nginx -t` does
    rproxy explain CONFIG URL [--method M] [--header K:V]...
                            which route, chain, upstream and server a request takes, and why
    rproxy reload [CONFIG]  reload the instance serving CONFIG (HUP to its master, by its pidfile)
    rproxy stop [CONFIG]    stop it gracefully (TERM) and wait until it is gone
    rproxy sample-config    print the commented default config
    rproxy reference        print the config reference (Markdown)
    rproxy --version

CONFIG defaults to $RPROXY_CONFIG, else conf/rproxy.ini.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import resources

from rproxy import __version__, instance
from rproxy import config as config_module


def check(path: str) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        print(f"rproxy: {e}", file=sys.stderr)
        return 1
    servers = sum(len(u.servers) for u in config.upstreams.values())
    print(f"{path}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
          f"{servers} servers)")
    print(f"pidfile: {instance.pidfile(config)}")
    print(f"control socket: {instance.control_socket(config) or 'off'}")
    return 0


def reload(path: str) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        # The master would refuse it too: say so here, where the user is.
        print(f"rproxy: {e}", file=sys.stderr)
        print("rproxy: not reloaded; the running instance keeps the config it has", file=sys.stderr)
        return 1
    try:
        pid = instance.signal_instance(config, signal.SIGHUP)
    except (config_module.ConfigError, OSError) as e:
        print(f"rproxy: {e}", file=sys.stderr)
        return 1
    print(f"rproxy: reloading {path} (master pid {pid})")
    return 0


def stop(path: str, timeout: float) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        print(f"rproxy: {e}", file=sys.stderr)
        print("rproxy: cannot tell which instance serves it: `kill -TERM $(cat PIDFILE)` stops one by hand",
              file=sys.stderr)
        return 1
    try:
        pid = instance.stop(config, timeout)
    except (config_module.ConfigError, OSError, TimeoutError) as e:
        print(f"rproxy: {e}", file=sys.stderr)
        return 1
    print(f"rproxy: stopped {path} (master pid {pid})")
    return 0


def sample_config() -> str:
    return resources.files("rproxy").joinpath("default.ini").read_text(encoding="utf-8")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rproxy", description="rproxy command-line tools")
    parser.add_argument("--version", action="version", version=f"rproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    default = config_module.config_path()
    check_cmd = commands.add_parser("check", help="validate a config file; exit 0 when valid")
    check_cmd.add_argument("config", nargs="?", default=default)
    explain_cmd = commands.add_parser("explain", help="show how a request would be routed, and why")
    explain_cmd.add_argument("config")
    explain_cmd.add_argument("url", help="e.g. http://api.example.com/v1/users")
    explain_cmd.add_argument("--method", "-X", default="GET")
    explain_cmd.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE")
    explain_cmd.add_argument("--client", default="127.0.0.1", help="the client's address")
    reload_cmd = commands.add_parser("reload", help="reload the running instance that serves CONFIG")
    reload_cmd.add_argument("config", nargs="?", default=default)
    stop_cmd = commands.add_parser("stop", help="stop the running instance that serves CONFIG")
    stop_cmd.add_argument("config", nargs="?", default=default)
    stop_cmd.add_argument("--timeout", type=float, default=60.0,
                          help="seconds to wait for it to finish its requests (default 60)")
    commands.add_parser("sample-config", help="print the commented default config")
    commands.add_parser("reference", help="print the config reference (Markdown)")
    return parser


def run(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    if args.command == "check":
        return check(args.config)
    if args.command == "explain":
        return explain_command(args)
    if args.command == "reload":
        return reload(args.config)
    if args.command == "stop":
        return stop(args.config, args.timeout)
    if args.command == "sample-config":
        sys.stdout.write(sample_config())
        return 0
    print(config_module.reference())
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader left early (`rproxy explain ... | head`): stop quietly, as
        # Unix tools do, and keep Python from complaining at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def explain_command(args) -> int:
    from rproxy.explain import explain
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as e:
        print(f"rproxy: {e}", file=sys.stderr)
        return 2
    headers = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            print(f"rproxy: --header {header!r} is not NAME:VALUE", file=sys.stderr)
            return 2
        headers.append((name.strip(), value.strip()))
    code, text = explain(config, args.url, args.method, headers, args.client)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
