"""Two real vLLM engines (the CPU build, each its own process) on one `flexkv serve`.

The engines' FlexKV config says ``server_client_mode`` with an external server: each engine's scheduler side
is a client of the server, each worker maps the server's CPU tier. The second engine hits what the first
stored; an engine killed while it holds blocks loses them when its lease runs out, and the other engine goes
on; a server killed mid-request leaves the engine serving (misses and skipped stores, logged and counted,
within a bounded time), and a restarted server serves again, warm from its SSD tier. Once every process is
SIGKILLed nothing of FlexKV's is left in /dev/shm and no process of theirs runs on.

References are the same engines' answers computed from scratch (a ``cache_salt`` of their own: no cached
block, neither vLLM's nor FlexKV's, can serve them). Everything runs in float32.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from server_helpers import ServerProcess
from vllm_helpers import BLOCK, Engine, assert_same, processes_tagged, random_prompt, shm_names, tagged_env

from flexkv.core.remote_plane import query_stats

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

LEASE_S = 2.0
TIMEOUT_S = 0.5
KV_MIB = 3.2  # about 50 vLLM blocks (float32, both KV heads in the one worker)


class Cluster:
    def __init__(self, model: Path, work: Path) -> None:
        self.work = work
        self.tag = f"vllm-server-{work.name}"
        self.endpoint = f"ipc://{work}/flexkv"
        self.config = work / "flexkv.json"
        self.config.write_text(json.dumps({
            "server_recv_port": self.endpoint, "server_client_mode": True, "server_launch_mode": "external",
            "server_lease_seconds": LEASE_S, "server_timeout_seconds": TIMEOUT_S,
            "model_config": {"num_layers": 2, "num_kv_heads": 2, "head_size": 64, "dtype": "float32"},
            "cache_config": {"enable_cpu": True, "num_cpu_blocks": 256, "tokens_per_block": BLOCK, "enable_ssd": True,
                             "num_ssd_blocks": 1024, "ssd_cache_dir": str(work / "ssd")}}))
        self.shm_before = shm_names()
        self.server = ServerProcess(work, self.config, env=tagged_env(self.tag)).start()
        self.engines = [Engine(model, work / f"engine{i}.log", config=self.config, kv_mib=KV_MIB, cores=str(i),
                               tag=self.tag) for i in range(2)]
        for e in self.engines:
            e.wait_ready()

    def stats(self) -> dict:
        return query_stats(self.endpoint, timeout_s=2.0)

    def session_tasks(self, engine: Engine) -> int:
        """Tasks the server holds for ``engine``'s session (0 if it has none)."""
        return sum(s["tasks"] for s in self.stats()["sessions"] if s["pid"] == engine.proc.pid)

    def close(self) -> None:
        for e in self.engines:
            e.stop()
        for e in self.engines:
            e.close()
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.stop()


@pytest.fixture(scope="module")
def cluster(tiny_model: Path):
    work = Path(tempfile.mkdtemp(prefix="fkv-", dir="/tmp"))  # short: ipc:// paths are limited to 107 bytes
    c = Cluster(tiny_model, work)
    try:
        yield c
    finally:
        c.close()
        shutil.rmtree(work, ignore_errors=True)


def fresh(engine: Engine, prompts: list[list[int]], max_tokens: int = 12) -> list[dict]:
    """The engine's answers computed from scratch: each prompt under a cache_salt of its own."""
    salts = [f"fresh-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    out = engine.generate(prompts, salts, max_tokens)
    assert all(o["cached"] == 0 for o in out)
    return out


def freeze_while_holding(cluster: Cluster, engine: Engine, make_prompts: Callable[[], list[list[int]]],
                         max_tokens: int = 24, timeout: float = 120.0) -> list[list[int]]:
    """Sends ``engine`` batches of new prompts until it is caught holding tasks on the server (blocks locked for
    a load, or reserved for a store it has not completed); stops it there (SIGSTOP) and returns that batch, whose
    answer is still to be read. A batch that ends before that is read and followed by another."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prompts = make_prompts()
        engine.send("generate", prompts=prompts, max_tokens=max_tokens)
        while not engine.has_result():
            if cluster.session_tasks(engine):
                engine.signal(signal.SIGSTOP)
                if cluster.session_tasks(engine):
                    return prompts
                engine.signal(signal.SIGCONT)
        engine.result()
    raise AssertionError(f"never caught the engine holding a task on the server within {timeout} s")


def test_a_second_engine_hits_what_the_first_stored(cluster: Cluster, seed: int) -> None:
    a, b = cluster.engines
    rng = np.random.default_rng(seed)
    prompt = random_prompt(rng, 20 * BLOCK + 17)
    first = a.generate([prompt])
    assert first[0]["cached"] == 0
    before = b.stats()["hit_tokens"]
    second = b.generate([prompt])
    assert second[0]["cached"] == 20 * BLOCK  # engine b never saw the prompt: every block came from FlexKV
    assert b.stats()["hit_tokens"] - before == 20 * BLOCK
    assert_same(first, second)
    stats = cluster.stats()
    assert len(stats["sessions"]) == 2 and stats["index"]["cpu"]["num_locked"] == 0, stats


def test_an_engine_killed_holding_blocks_loses_them_after_its_lease(cluster: Cluster, seed: int) -> None:
    a, b = cluster.engines
    rng = np.random.default_rng(seed)
    prefixes = [random_prompt(rng, 12 * BLOCK) for _ in range(3)]
    a.generate(prefixes)  # stored by engine a: engine b loads them from FlexKV, and stores the new suffixes

    caught = freeze_while_holding(cluster, b, lambda: [p + random_prompt(rng, 3 * BLOCK + 5) for p in prefixes])
    assert cluster.stats()["index"]["cpu"]["num_locked"] > 0 or cluster.session_tasks(b) > 0
    b.signal(signal.SIGKILL)
    t0 = time.monotonic()
    while cluster.stats()["index"]["cpu"]["num_locked"] or any(s["pid"] == b.proc.pid
                                                              for s in cluster.stats()["sessions"]):
        assert time.monotonic() - t0 < LEASE_S + 3, cluster.stats()
        time.sleep(0.05)
    assert cluster.stats()["expired_sessions"] >= 1
    # Engine a loads the same blocks (and whatever of engine b's stores completed): the answers computed anew.
    reference = fresh(a, caught)
    got = a.generate(caught)
    assert all(o["cached"] >= 12 * BLOCK for o in got)
    assert_same(reference, got)
    # The last requests' stores end when vLLM reports them, in a later engine step: a short request steps it.
    for _ in range(3):
        if cluster.stats()["index"]["cpu"]["num_locked"] == 0:
            break
        a.generate([random_prompt(rng, BLOCK // 2)])
    assert cluster.stats()["index"]["cpu"]["num_locked"] == 0


def test_a_server_killed_mid_request_then_restarted_serves_warm_from_ssd(cluster: Cluster, seed: int) -> None:
    a = cluster.engines[0]
    rng = np.random.default_rng(seed)
    warm = [random_prompt(rng, 10 * BLOCK) for _ in range(2)]
    written = cluster.stats()["counters"]["ssd_written_blocks"]
    a.generate(warm)
    t0 = time.monotonic()
    while cluster.stats()["counters"]["ssd_written_blocks"] < written + 20:  # written through to SSD
        assert time.monotonic() - t0 < 30, cluster.stats()
        time.sleep(0.05)
    later = [w + random_prompt(rng, BLOCK + 3) for w in warm]
    reference_later = fresh(a, later)

    # The server dies while it holds tasks of engine a's requests; those requests end with the right tokens.
    failures = a.stats()["failures"]
    caught = freeze_while_holding(cluster, a, lambda: [random_prompt(rng, 6 * BLOCK) for _ in range(3)])
    cluster.server.stop(signal.SIGKILL)
    a.signal(signal.SIGCONT)
    answers = a.result()
    assert_same(fresh(a, caught, max_tokens=24), answers)
    # With the server gone the engine serves on: misses and skipped stores, each call bounded.
    t0 = time.monotonic()
    assert_same(reference_later, a.generate(later))
    assert time.monotonic() - t0 < 20
    assert a.stats()["failures"] > failures

    cluster.server.start()  # the same config: the same SSD files
    t0 = time.monotonic()
    while not any(s["pid"] == a.proc.pid for s in cluster.stats()["sessions"]):  # engine a reconnects by itself
        assert time.monotonic() - t0 < LEASE_S + 5, cluster.stats()
        time.sleep(0.05)
    a.generate([random_prompt(rng, 20 * BLOCK) for _ in range(3)])  # evicts the warm prompts from vLLM's cache
    before = a.stats()
    got = a.generate(later)
    after = a.stats()
    assert after["hit_tokens"] - before["hit_tokens"] >= 20 * BLOCK, after  # FlexKV served them again ...
    assert after["ssd_hit_tokens"] >= 20 * BLOCK, after  # ... from the SSD tier the old server wrote
    assert_same(reference_later, got)


def test_every_process_sigkilled_leaves_nothing_in_dev_shm(cluster: Cluster) -> None:
    assert processes_tagged(cluster.tag), "the server and engines should be running"
    cluster.server.stop(signal.SIGKILL)
    for e in cluster.engines:
        if e.proc.poll() is None:
            e.signal(signal.SIGKILL)
    t0 = time.monotonic()
    while processes_tagged(cluster.tag):
        assert time.monotonic() - t0 < 10, processes_tagged(cluster.tag)
        time.sleep(0.05)
    assert shm_names() - cluster.shm_before == set()
