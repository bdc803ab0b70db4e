"""The ``flexkv`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import FlexKVError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexkv", description="FlexKV: KV-cache offloading for LLM engines")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="replay a multi-turn chat workload against cache configurations")
    from . import bench as bench_mod

    bench_mod.add_arguments(bench)
    sub.add_parser("check-config", add_help=False, help="print a config file resolved, with the bytes each tier uses")
    from . import serve_cmd

    serve_cmd.add_serve_arguments(sub.add_parser("serve", help="run the control plane as a server for engines"))
    serve_cmd.add_stats_arguments(sub.add_parser("stats", help="print a running server's counters and clients"))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"]:
        from .check_config import main as check_config_main

        return check_config_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from .log import limit_failure_lines

    limit_failure_lines()
    try:
        if args.command == "bench":
            return bench_mod.main(args)
        if args.command == "serve":
            if args.log_level.upper() == "WARNING":  # a server says what it does
                logging.getLogger().setLevel(logging.INFO)
            return serve_cmd.serve(args)
        if args.command == "stats":
            return serve_cmd.stats(args)
    except FlexKVError as e:
        print(f"flexkv {args.command}: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
