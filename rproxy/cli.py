"""rproxy's command line.

    rproxy check [CONFIG]   validate a config the way `nginx -t` does
    rproxy explain CONFIG URL [--method M] [--header K:V]...
                            which route, chain, upstream and server a request takes, and why
    rproxy reference        print the config reference (Markdown)
"""

from __future__ import annotations

import argparse
import sys

from . import config as config_module


def check(path: str) -> int:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as e:
        print(f"rproxy: {e}", file=sys.stderr)
        return 1
    servers = sum(len(u.servers) for u in config.upstreams.values())
    print(f"{path}: ok ({len(config.routes)} routes, {len(config.upstreams)} upstreams, "
          f"{servers} servers)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rproxy", description="rproxy command-line tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check_cmd = commands.add_parser("check", help="validate a config file; exit 0 when valid")
    check_cmd.add_argument("config", nargs="?", default=config_module.config_path())
    explain_cmd = commands.add_parser("explain", help="show how a request would be routed, and why")
    explain_cmd.add_argument("config")
    explain_cmd.add_argument("url", help="e.g. http://api.example.com/v1/users")
    explain_cmd.add_argument("--method", "-X", default="GET")
    explain_cmd.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE")
    explain_cmd.add_argument("--client", default="127.0.0.1", help="the client's address")
    commands.add_parser("reference", help="print the config reference (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.config)
    if args.command == "explain":
        return explain_command(args)
    print(config_module.reference())
    return 0


def explain_command(args) -> int:
    from .explain import explain
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
