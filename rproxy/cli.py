"""rproxy's command line.

    rproxy check [CONFIG]   validate a config the way `nginx -t` does
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
    commands.add_parser("reference", help="print the config reference (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.config)
    print(config_module.reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
