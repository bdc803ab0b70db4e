"""FlexKV's TensorRT-LLM connector driven through TensorRT-LLM 1.2's call sequence (tests/trtllm_executor.py):
new requests, chunked prefill, synchronous and asynchronous loads, finish with delayed free, get_finished."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from trtllm_executor import MiniExecutor, Request

from flexkv.adapters.trtllm import FlexKVSchedulerConnector, FlexKVWorkerConnector
from flexkv.adapters.trtllm.session import drop_session
from flexkv.core.errors import ConfigError, LayoutError, TaskError

TPB = 4
LAYERS = 3
HEADS_X_DIM = 2 * 8


def llm_args(**overrides: object) -> SimpleNamespace:
    kv = dict(tokens_per_block=TPB, enable_block_reuse=True, enable_partial_reuse=False, host_cache_size=None)
    kv.update(overrides.pop("kv_cache_config", {}))  # type: ignore[arg-type]
    args = dict(model="tiny-trtllm-test", tensor_parallel_size=1, pipeline_parallel_size=1, max_beam_width=1,
                kv_cache_config=SimpleNamespace(**kv))
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(num_cpu_blocks: int = 256, ssd_blocks: int = 0) -> Path:
        cache = {"tokens_per_block": TPB, "num_cpu_blocks": num_cpu_blocks, "enable_ssd": ssd_blocks > 0}
        if ssd_blocks:
            cache.update(num_ssd_blocks=ssd_blocks, ssd_cache_dir=str(tmp_path / "ssd"))
        path = tmp_path / "flexkv.json"
        path.write_text(json.dumps({"cache_config": cache}))
        monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(path))
        return path

    return write


@pytest.fixture
def executor_factory():
    made = []

    def make(args: SimpleNamespace, *, num_blocks: int = 96, chunk_tokens: int | None = None,
             device: str = "cpu") -> MiniExecutor:
        # py_executor_creator.py builds the worker and the scheduler from the same llm_args.
        worker = FlexKVWorkerConnector(args)
        scheduler = FlexKVSchedulerConnector(args)
        ex = MiniExecutor(scheduler, worker, num_blocks=num_blocks, num_layers=LAYERS, tokens_per_block=TPB,
                          heads_x_dim=HEADS_X_DIM, chunk_tokens=chunk_tokens, device=device)
        made.append(args)
        return ex

    yield make
    for args in made:
        drop_session(args)


def prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(5, 30000) for _ in range(n)]


def run_sequence(ex: MiniExecutor, rng: random.Random) -> None:
    """A conversation's turns: each turn's prompt is the previous turn's prompt, its answer and more text."""
    base = prompt(37, rng)
    first = Request(1, base, max_new_tokens=3)
    ex.add_request(first)
    ex.run()
    stats = ex.scheduler.stats()
    assert stats["stored_tokens"] == (37 + 3 - 1) // TPB * TPB
    assert not ex.pinned, "every store was reported saved and its blocks freed"

    # The engine's own reuse is gone (memory pressure): the next turn loads its prefix from FlexKV.
    ex.evict_device_cache()
    second = Request(2, first.tokens + prompt(11, rng), max_new_tokens=2)
    ex.add_request(second)
    ex.run()
    stats = ex.scheduler.stats()
    assert stats["hit_tokens"] == (37 + 3 - 1) // TPB * TPB  # every whole block of turn 1
    assert stats["metrics"]["histograms"]["load"]["count"] >= 1  # the control plane timed the load

    # A third turn with the engine's reuse of part of the prefix: FlexKV loads only what follows it.
    ex.evict_device_cache()
    keep = second.tokens[: 2 * TPB]
    ex.device_cache[tuple(keep[:TPB])] = ex.free.pop(0)
    ex.device_cache[tuple(keep)] = ex.free.pop(0)
    for i, block in enumerate(ex.device_cache.values()):  # the engine's blocks hold the prefix's KV
        req = Request(99, keep, 0)
        req.block_ids = [block] * 2
        for layer in range(LAYERS):
            for p in range(i * TPB, (i + 1) * TPB):
                ex.write_kv(req, p, layer)
    hits = ex.scheduler.stats()["hit_tokens"]
    third = Request(3, second.tokens + prompt(9, rng), max_new_tokens=2)
    ex.add_request(third)
    ex.run()
    loaded = ex.scheduler.stats()["hit_tokens"] - hits
    assert loaded == (len(second.tokens) - 1) // TPB * TPB - 2 * TPB
    assert ex.layer_checks > 0
    assert ex.worker.load_failures == 0 and ex.scheduler.stats()["failures"] == 0


def test_conversation_turns_load_their_prefix_byte_exact(config, executor_factory, seed: int) -> None:
    config()
    ex = executor_factory(llm_args())
    run_sequence(ex, random.Random(seed))


def test_chunked_prefill_and_concurrent_requests(config, executor_factory, seed: int) -> None:
    config()
    rng = random.Random(seed)
    ex = executor_factory(llm_args(), chunk_tokens=2 * TPB, num_blocks=160)
    shared = prompt(30, rng)
    ex.add_request(Request(10, shared + prompt(5, rng), max_new_tokens=2))
    ex.run()
    ex.evict_device_cache()
    # Three requests in one batch: two share the stored prefix, one is new; prefill runs in chunks.
    for rid in (11, 12, 13):
        tail = prompt(7, rng)
        ex.add_request(Request(rid, (shared if rid != 13 else prompt(30, rng)) + tail, max_new_tokens=3))
    ex.run()
    assert ex.scheduler.stats()["hit_tokens"] == 2 * (30 // TPB * TPB)
    assert ex.worker.load_failures == 0


def test_blocks_on_ssd_load_asynchronously(config, executor_factory, seed: int) -> None:
    config(num_cpu_blocks=12, ssd_blocks=256)
    rng = random.Random(seed)
    ex = executor_factory(llm_args())
    old = Request(20, prompt(41, rng), max_new_tokens=2)
    ex.add_request(old)
    ex.run()
    kv = ex.scheduler.session.kv
    deadline = time.monotonic() + 30  # the write-through to SSD runs in the background
    while kv.lookup(old.tokens[:40])[1] < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Newer requests push the old one's blocks out of the small CPU tier; they stay on SSD.
    for rid in range(21, 29):
        ex.add_request(Request(rid, prompt(41, rng), max_new_tokens=2))
        ex.run()
        if kv.lookup(old.tokens[:40])[0] < 40:
            break
    ex.evict_device_cache()
    cpu_tokens, ssd_tokens = kv.lookup(old.tokens[:40])
    assert ssd_tokens == 40 and cpu_tokens < 40
    again = Request(30, old.tokens + prompt(6, rng), max_new_tokens=2)
    ex.add_request(again)
    ex.run()
    assert ex.async_loads == 1
    assert again.is_finished
    assert ex.scheduler.stats()["hit_tokens"] >= 40
    assert ex.worker.load_failures == 0 and ex.scheduler.stats()["failures"] == 0


def test_delayed_free_keeps_blocks_until_the_store_is_reported(config, executor_factory, seed: int) -> None:
    config()
    rng = random.Random(seed)
    ex = executor_factory(llm_args())
    req = Request(30, prompt(25, rng), max_new_tokens=1)
    ex.add_request(req)
    plane = ex.scheduler.session.kv.control_plane
    plane.pause_completions(True)  # the store's copy cannot end: get_finished cannot report it yet
    try:
        while req not in ex.finished:
            ex.step()
        for _ in range(3):
            ex.step()
        # request_finished returned True: the blocks stay pinned until get_finished reports the request.
        saved_once = ex.pinned.get(30)
        assert saved_once and not set(saved_once) & set(ex.free)
    finally:
        plane.pause_completions(False)
    ex.run()
    assert saved_once is not None and 30 not in ex.pinned
    assert set(saved_once) <= set(ex.free)


def test_unknown_and_dummy_requests_are_misses(config, executor_factory) -> None:
    config()
    ex = executor_factory(llm_args())
    dummy = Request(40, list(range(100, 120)), 1)
    dummy.is_dummy_request = True
    assert ex.scheduler.get_num_new_matched_tokens(dummy, 0) == (0, False)
    stranger = Request(41, list(range(100, 120)), 1)
    ex.scheduler.update_state_after_alloc(stranger, [1, 2, 3])  # never matched: nothing to do
    assert ex.scheduler.request_finished(stranger, []) is False
    assert ex.worker.get_finished([], []) == ([], [])


def test_bad_pools_and_settings_are_refused(config, executor_factory) -> None:
    config()
    args = llm_args()
    worker = FlexKVWorkerConnector(args)
    try:
        with pytest.raises(LayoutError, match="num_blocks, num_layers, kv_factor"):
            worker.register_kv_caches(torch.zeros(8, 3, 16))
        with pytest.raises(LayoutError, match="not a multiple of tokens_per_block"):
            worker.register_kv_caches(torch.zeros(8, 3, 2, 18, dtype=torch.bfloat16))
        worker.register_kv_caches(torch.zeros(8, 3, 2, 16, dtype=torch.bfloat16))
        with pytest.raises(LayoutError, match="already registered"):
            worker.register_kv_caches(torch.zeros(8, 3, 2, 16, dtype=torch.bfloat16))
    finally:
        drop_session(args)
    with pytest.raises(ConfigError, match="pipeline_parallel_size=2"):
        FlexKVSchedulerConnector(llm_args(pipeline_parallel_size=2))
    with pytest.raises(ConfigError, match="enable_partial_reuse"):
        FlexKVSchedulerConnector(llm_args(kv_cache_config={"enable_partial_reuse": True}))
    with pytest.raises(ConfigError, match="enable_block_reuse"):
        FlexKVWorkerConnector(llm_args(kv_cache_config={"enable_block_reuse": False}))
    with pytest.raises(ConfigError, match="host_cache_size"):
        FlexKVWorkerConnector(llm_args(kv_cache_config={"host_cache_size": 1 << 30}))


def test_module_paths_from_the_docs_resolve() -> None:
    import importlib

    for module in ("flexkv.adapters.trtllm", "flexkv.integration.tensorrt_llm.trtllm_adapter"):
        m = importlib.import_module(module)
        assert m.FlexKVSchedulerConnector is FlexKVSchedulerConnector
        assert m.FlexKVWorkerConnector is FlexKVWorkerConnector


@pytest.mark.gpu
def test_conversation_turns_on_cuda_tensors(config, executor_factory, seed: int) -> None:
    config()
    ex = executor_factory(llm_args(), device="cuda")
    run_sequence(ex, random.Random(seed))


def test_the_example_yaml_configures_the_connector(config) -> None:
    import importlib

    import yaml

    config()
    path = Path(__file__).resolve().parents[1] / "examples" / "trtllm" / "extra-llm-api-config.yml"
    extra = yaml.safe_load(path.read_text())
    conn = extra["kv_connector_config"]
    assert set(conn) == {"connector_module", "connector_scheduler_class", "connector_worker_class"}
    module = importlib.import_module(conn["connector_module"])
    kv = dict(tokens_per_block=TPB, **extra["kv_cache_config"])
    args = llm_args(kv_cache_config=kv)
    try:
        scheduler = getattr(module, conn["connector_scheduler_class"])(args)
        getattr(module, conn["connector_worker_class"])(args)
        assert scheduler.tokens_per_block == TPB
    finally:
        drop_session(args)


def test_unexpected_dtypes_and_block_ids_are_refused(config, executor_factory, seed: int) -> None:
    config()
    args = llm_args()
    worker = FlexKVWorkerConnector(args)
    try:
        with pytest.raises(ConfigError, match="dtype"):
            worker.register_kv_caches(torch.zeros(8, 3, 2, 16, dtype=torch.float64))
    finally:
        drop_session(args)
    rng = random.Random(seed)
    ex = executor_factory(llm_args(), num_blocks=32)
    first = Request(50, prompt(21, rng), max_new_tokens=1)
    ex.add_request(first)
    ex.run()
    ex.evict_device_cache()
    again = Request(51, first.tokens + [7, 8, 9], max_new_tokens=1)
    matched, is_async = ex.scheduler.get_num_new_matched_tokens(again, 0)
    assert matched == 20 and not is_async
    kv = ex.scheduler.session.kv
    with pytest.raises(TaskError, match="engine blocks"):
        ex.scheduler.update_state_after_alloc(again, [0, 1, 2, 99, 4, 5])  # block 99: the pool has 32
    assert kv.cache_stats()["cpu"]["num_locked"] == 0  # the refused load holds nothing
