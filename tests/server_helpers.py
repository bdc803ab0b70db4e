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
import torch

from flexkv.core import DataPlane, KVManager
from flexkv.core.remote_plane import query_stats
from flexkv.core.server_launch import ServerSettings

from kv_helpers import DEFAULT_CACHE, DEFAULT_MODEL, configs, engine_for, random_tokens

LEASE_S = 1.0
TPB = 16
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
    kw = {"server_client_mode": True, "server_launch_mode": "external", "server_lease_seconds": LEASE_S,
          "server_timeout_seconds": TIMEOUT_S, **kw}
    return ServerSettings(server_recv_port=endpoint, **kw)


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


def store_in_one_load_in_other(writer: KVManager, reader: KVManager, rng: np.random.Generator, seed: int) -> None:
    """Four blocks the writer stores (from its engine) load byte-exact into the reader's poisoned engine."""
    tokens = random_tokens(rng, 4 * TPB + 5)
    src = engine_for(writer, num_blocks=16, gen=torch.Generator().manual_seed(seed))
    dst = engine_for(reader, num_blocks=16, gen=torch.Generator().manual_seed(seed + 1))
    expected = src.fill(range(4))
    dst.poison()
    wp = DataPlane(writer.tier_info(), src.engine_layout(), writer.cache_config)
    rp = DataPlane(reader.tier_info(), dst.engine_layout(), reader.cache_config)
    try:
        task, mask = writer.put_match(tokens)
        assert mask.sum() == 4 * TPB
        copy_task(writer, wp, task, np.arange(4), store=True)
        task, mask = reader.get_match(tokens)
        assert mask.sum() == 4 * TPB, "the second client must hit what the first stored"
        moved = copy_task(reader, rp, task, np.array([8, 9, 10, 11]), store=False)
    finally:
        wp.close()
        rp.close()
    assert sorted(moved) == [8, 9, 10, 11]
    dst.assert_blocks([8, 9, 10, 11], expected)
    dst.assert_poisoned([0, 1, 2, 3, 12])
    stats = reader.cache_stats()
    assert stats["get_hit_blocks"] >= 4 and stats["cpu"]["num_locked"] == 0
