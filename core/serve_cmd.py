"""``flexkv serve --config cfg.json`` and ``flexkv stats``.

``serve`` runs the control plane of the config's ``model_config`` and ``cache_config`` at its
``server_recv_port`` until SIGTERM or SIGINT, then ends every client's tasks, lets copies in flight finish and
removes its socket and lock files. ``stats`` prints a running server's counters and clients.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time

from .config_file import load_config
from .errors import ConfigError, FlexKVError
from .log import limit_failure_lines
from .metrics import PlaneObservers, plane_snapshot, render_table

logger = logging.getLogger("flexkv")

_PR_SET_PDEATHSIG = 1


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the FlexKV config file (default: FLEXKV_CONFIG_PATH); it needs model_config")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics (default: the config's metrics_port; "
                        "0: none)")
    p.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)  # the embedded launch's engine
    p.add_argument("--remove-config", action="store_true", help=argparse.SUPPRESS)


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the config file whose server_recv_port names the server")
    p.add_argument("--endpoint", "--server", help="the server's endpoint (instead of --config)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="read a cache's Prometheus endpoint instead (an engine's in-process cache with metrics_port)")
    p.add_argument("--json", action="store_true", help="print JSON (one line per refresh with --watch)")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="refresh every SECONDS until interrupted (a live table)")


def _end_with_parent(parent_pid: int) -> None:
    """An embedded server gets SIGTERM when the engine process that started it ends, however it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # it ended before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def serve(args: argparse.Namespace) -> int:
    from .server import FlexKVServer

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.parent_pid:
        _end_with_parent(args.parent_pid)
    try:
        config = load_config(args.config)
    finally:
        if args.remove_config and args.config:
            with contextlib.suppress(OSError):
                os.unlink(args.config)
    if config.model_config is None:
        raise ConfigError("flexkv serve needs model_config in the config file: the server sizes the CPU and SSD "
                          "blocks of one model's KV layout", "model_config")
    server = FlexKVServer(config.model_config, config.resolved_cache(), config.server_recv_port,
                          token=config.server_token, lease_s=config.server_lease_seconds)
    server.start()
    observers = PlaneObservers(lambda: plane_snapshot(server.plane), server.cache_config.tokens_per_block,
                               metrics_port=config.metrics_port if args.metrics_port is None else args.metrics_port,
                               every_requests=config.num_log_interval_requests,
                               every_s=config.log_interval_seconds, extra=server.server_gauges)
    try:
        while not stop.wait(0.2):
            if server.stopped:
                logger.error("FlexKV server: stopped by an internal error")
                return 1
    finally:
        logger.warning("FlexKV server (pid %d): stopping", os.getpid())
        observers.close()
        server.close()
    return 0


def stats(args: argparse.Namespace) -> int:
    from .remote_plane import query_stats

    if args.metrics:
        return _scraped_stats(args)

    token = ""
    endpoint = args.endpoint
    if endpoint is None or args.config:
        config = load_config(args.config)
        endpoint = endpoint or config.server_recv_port
        token = config.server_token
    else:
        token = os.environ.get("FLEXKV_SERVER_TOKEN", "")
    while True:
        s = query_stats(endpoint, token)
        if args.json:
            print(json.dumps(s, sort_keys=True), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(_render(s), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _scraped_stats(args: argparse.Namespace) -> int:
    """The tables of a cache that serves metrics (an in-process manager's metrics_port), from its endpoint."""
    import urllib.request

    from .metrics import snapshot_from_scrape

    url = args.metrics if "://" in args.metrics else f"http://{args.metrics}"
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                snap, tpb = snapshot_from_scrape(r.read().decode())
        except OSError as e:
            raise FlexKVError(f"no FlexKV metrics at {url}: {e}") from None
        if args.json:
            print(json.dumps(snap, sort_keys=True), flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(f"FlexKV metrics at {url}\n\n{render_table(snap, tpb)}", flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _render(s: dict) -> str:
    lines = [f"FlexKV server pid {s['pid']} at {s['endpoint']}: {s['tiers']}",
             f"requests {s['requests']}, refused {s['refused']}, clients {len(s['sessions'])}, "
             f"leases expired {s['expired_sessions']}"]
    for sess in s["sessions"]:
        lines.append(f"  client {sess['client']} (instance {sess['instance']}): {sess['tasks']} tasks, "
                     f"idle {sess['idle_s']:.1f} s")
    return "\n".join([*lines, "", render_table(s, int(s["tokens_per_block"]))])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexkv serve", description=__doc__.splitlines()[0])
    add_serve_arguments(p)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_failure_lines()
    try:
        return serve(args)
    except FlexKVError as e:
        print(f"flexkv serve: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
