"""`flexkv serve` in a real process for the server tests, and clients that copy through DataPlane as an
engine's worker does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flexkv.core import DataPlane, KVManager
from flexkv.core.remote_plane import query_stats
from flexkv.core.server_launch import ServerSettings

from kv_helpers import DEFAULT_CACHE, DEFAULT_MODEL, configs

LEASE_S = 1.0
TIMEOUT_S = 0.5


def server_config(tmp: Path, endpoint: str, **top: Any) -> Path:
    """A config file for `flexkv serve` over the tests' default model and cache."""
    cfg = {"server_recv_port": endpoint, "server_lease_seconds": LEASE_S, "model_config": DEFAULT_MODEL,
           "cache_config": {**DEFAULT_CACHE, **top.pop("cache_config", {})}, **top}
    path = tmp / f"serve-{abs(hash(endpoint)) % 10**8}.json"
    path.write_text(json.dumps(cfg))
    return path


class ServerProcess:
    """``flexkv serve --config <file>`` started from a neutral directory, its log in a file."""

    def __init__(self, tmp: Path, config: Path, env: dict[str, str] | None = None) -> None:
        self.tmp, self.config = tmp, config
        self.env = env  # the server's whole environment; default: this one without FLEXKV_* overrides
        cfg = json.loads(config.read_text())
        self.endpoint = cfg["server_recv_port"]
        self.token = cfg.get("server_token", "")
        self.log = tmp / f"{config.stem}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> ServerProcess:
        env = self.env if self.env is not None else {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "flexkv.core.cli", "serve", "--config",
                                          str(self.config)], cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)
        if wait:
            self.wait_up()
        return self

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, f"flexkv serve exited:\n{self.output()}"
            try:
                query_stats(self.endpoint, self.token, timeout_s=0.5)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(f"flexkv serve did not answer within {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def settings(endpoint: str, **kw: Any) -> ServerSettings:
    return ServerSettings(server_recv_port=endpoint, server_client_mode=True, server_launch_mode="external",
                          server_lease_seconds=LEASE_S, server_timeout_seconds=TIMEOUT_S, **kw)


def client(endpoint: str, **overrides: Any) -> KVManager:
    """A started KVManager that is a client of the server at ``endpoint``."""
    extra = {k: overrides.pop(k) for k in ("dp_client_id",) if k in overrides}
    model, cache = configs(**overrides)
    kv = KVManager(model, cache, server_settings=settings(endpoint), **extra)
    kv.start()
    return kv


def copy_task(kv: KVManager, plane: DataPlane, task: int, engine_blocks: np.ndarray, store: bool) -> np.ndarray:
    """Takes a task, copies its blocks as a worker would, completes it; returns the engine blocks moved."""
    seq, host = kv.take_external(task)
    moved = np.asarray(engine_blocks)[seq]
    if len(seq):
        job = plane.submit("engine_to_host" if store else "host_to_engine", moved, host)
        done = []
        while not done:
            done = plane.poll(1_000_000)
        assert done == [(job, "")], done
    kv.finish_external(task, True)
    return moved
