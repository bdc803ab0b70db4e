"""What `flexkv serve` adds to a request: ``get_match + launch + wait`` of a 4K-token prompt through a server
over ipc vs the same calls on a control plane in the engine's own process.

Both managers use the same model, cache config and host engine memory (a TensorRT-LLM-style pool
``[blocks, layers, k|v, tokens*heads*head_size]``, ``--block-kib`` KiB per block of 16 tokens). In process,
the manager's copy engine moves the blocks; through the server, the client's ``register_kv_caches`` joins
the server as a rank, the server orders the copy and the client's rank agent moves the head slice it owns
(here: all of it) between the pool and the server's CPU tier, mapped from its memfd. So both paths copy the
same bytes with the same copy code, and the difference is the control plane's messages: get_match, launch,
the order to the rank and its answer, and wait.

* get: one cached prompt of ``--tokens`` tokens, loaded into the same random engine blocks each round;
* put: a fresh prompt of the same length stored from random engine blocks (new CPU blocks each round).

The two modes alternate call by call; the figure is the median (p50) and p99 of ``--rounds`` calls each,
and the server's overhead is p50(server) - p50(in process). Goal: <= 150 us at p50 over ipc.

    python -P benchmarks/server_round_trip.py [--tokens 4096] [--block-kib 4] [--rounds 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from flexkv import CacheConfig, KVManager, ModelConfig
from flexkv.core.layout import EngineLayout
from flexkv.core.remote_plane import query_stats
from flexkv.core.server_launch import ServerSettings

TPB, LAYERS = 16, 4
GOAL_US = 150.0


def model_for(block_kib: int) -> dict:
    """A float16 model whose blocks of TPB tokens hold block_kib KiB."""
    elems = (block_kib << 10) // (TPB * LAYERS * 2 * 2)
    heads = 1 if elems <= 128 else elems // 128
    return {"num_layers": LAYERS, "num_kv_heads": heads, "head_size": elems // heads, "dtype": "float16"}


def start_server(tmp: Path, model: dict, cache: dict) -> tuple[subprocess.Popen, str]:
    endpoint = f"ipc://{tmp}/bench.sock"
    cfg = tmp / "serve.json"
    cfg.write_text(json.dumps({"server_recv_port": endpoint, "model_config": model, "cache_config": cache}))
    proc = subprocess.Popen([sys.executable, "-P", "-m", "flexkv.core.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
    deadline = time.monotonic() + 60
    while True:
        try:
            query_stats(endpoint, timeout_s=0.5)
            return proc, endpoint
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"flexkv serve did not start:\n{(tmp / 'serve.log').read_text()}") from None


class Caller:
    """get and put of one manager over its registered pool, each call timed from get_match/put_match to the
    end of wait."""

    def __init__(self, kv: KVManager, rng: np.random.Generator, n_blocks: int) -> None:
        self.kv, self.rng = kv, rng
        offsets = np.arange(TPB, dtype=np.int64)
        order = rng.permutation(kv.engine_layout.num_blocks).astype(np.int64)
        self.get_slots = (order[:n_blocks, None] * TPB + offsets).reshape(-1)
        self.put_slots = (order[n_blocks:2 * n_blocks, None] * TPB + offsets).reshape(-1)
        self.cached = self.fresh()
        self.put(self.cached)

    def fresh(self) -> np.ndarray:
        return self.rng.integers(0, 150_000, len(self.get_slots), dtype=np.int64)

    def _call(self, match, tokens: np.ndarray, slots: np.ndarray) -> float:
        t0 = time.perf_counter()
        task, mask = match(tokens)
        self.kv.launch(task, slots)
        ok = self.kv.wait(task)[task].ok
        dt = time.perf_counter() - t0
        assert ok and mask.all(), (match.__name__, ok, int(mask.sum()))
        return dt

    def get(self) -> float:
        return self._call(self.kv.get_match, self.cached, self.get_slots)

    def put(self, tokens: np.ndarray | None = None) -> float:
        return self._call(self.kv.put_match, self.fresh() if tokens is None else tokens, self.put_slots)


def bare_round_trip_s(tmp: Path, n: int = 2000) -> float:
    """The floor: p50 of one 100-byte DEALER -> ROUTER -> DEALER round trip over ipc between two threads."""
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind(f"ipc://{tmp}/ping.sock")
    dealer.connect(f"ipc://{tmp}/ping.sock")

    def echo() -> None:
        for _ in range(n):
            router.send_multipart(router.recv_multipart())

    t = threading.Thread(target=echo)
    t.start()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        dealer.send_multipart([b"12345678", b"x" * 100])
        dealer.recv_multipart()
        times.append(time.perf_counter() - t0)
    t.join()
    ctx.destroy(0)
    return float(np.median(times[n // 10:]))


def wait_ready(kv: KVManager) -> None:
    deadline = time.monotonic() + 30
    while not kv.is_ready():
        assert time.monotonic() < deadline, "the client's rank did not register with the server"
        time.sleep(0.01)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--block-kib", type=int, default=4)
    p.add_argument("--rounds", type=int, default=400)
    args = p.parse_args()
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    n_blocks = args.tokens // TPB
    model = model_for(args.block_kib)
    cache = {"num_cpu_blocks": n_blocks * (args.rounds + 8), "tokens_per_block": TPB}
    mc, cc = ModelConfig(**model), CacheConfig(**cache)
    pool = rng.integers(0, 256, (2 * n_blocks, mc.block_bytes(TPB)), dtype=np.uint8)
    layout = EngineLayout.from_block_views([pool], "pool")
    with tempfile.TemporaryDirectory(prefix="flexkv-bench-") as tmp:
        bare = bare_round_trip_s(Path(tmp))
        server, endpoint = start_server(Path(tmp), model, cache)
        local = KVManager(mc, cc)
        remote = KVManager(mc, cc, server_settings=ServerSettings(server_recv_port=endpoint, server_client_mode=True,
                                                                  server_launch_mode="external"))
        try:
            for kv in (local, remote):
                kv.start()
                kv.register_kv_caches(layout)
            wait_ready(remote)
            callers = {"in process": Caller(local, rng, n_blocks), "server": Caller(remote, rng, n_blocks)}
            times: dict[tuple[str, str], list[float]] = {(m, op): [] for m in callers for op in ("get", "put")}
            for r in range(args.rounds + 20):
                for mode in (("in process", "server") if r % 2 == 0 else ("server", "in process")):
                    for op in ("get", "put"):
                        dt = getattr(callers[mode], op)()
                        if r >= 20:  # the first rounds warm up sockets, threads and pages
                            times[(mode, op)].append(dt)
        finally:
            remote.shutdown()
            local.shutdown()
            server.terminate()
            server.wait(30)
    print(f"server_round_trip: {args.tokens} tokens = {n_blocks} blocks of {args.block_kib} KiB, {args.rounds} "
          f"alternating calls per mode, host pool, CPU tier; seed {seed}")
    print(f"{'op':>4} {'in process p50':>14} {'p99':>8} {'server p50':>10} {'p99':>8} {'added p50':>9} {'goal':>5}")
    for op in ("get", "put"):
        a, b = (np.array(times[(m, op)]) * 1e6 for m in ("in process", "server"))
        added = np.median(b) - np.median(a)
        print(f"{op:>4} {np.median(a):>12.0f}us {np.percentile(a, 99):>6.0f}us {np.median(b):>8.0f}us "
              f"{np.percentile(b, 99):>6.0f}us {added:>7.0f}us {'met' if added <= GOAL_US else 'MISS':>5}")
    print(f"added: server p50 - in-process p50 (goal <= {GOAL_US:.0f} us for get over ipc); one bare zmq round "
          f"trip over ipc between two Python threads, same run: {bare * 1e6:.0f} us p50 (a server get is 3 client "
          "round trips and one order to the rank and back)")


if __name__ == "__main__":
    main()
