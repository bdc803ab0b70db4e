"""Copies made by another process's data plane: the KVManager plans and ends the tasks
(take_external / finish_external), a DataPlane maps the CPU tier by name and moves the bytes, as vLLM's
worker process does for the scheduler's KVManager. Engine data is fresh random bytes; destinations are
poisoned first."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, KVManager, ModelConfig
from flexkv.core.data_plane import DataPlane
from flexkv.core.errors import LayoutError, TaskError
from flexkv.core.layout import EngineLayout

L, H, D, T, B = 2, 2, 16, 16, 32


def engine(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2, T, H, D, generator=g).to(torch.float16) for _ in range(L)]


@pytest.fixture
def kv():
    model = ModelConfig(num_layers=L, num_kv_heads=H, head_size=D, dtype="float16")
    with KVManager(model, CacheConfig(tokens_per_block=T, num_cpu_blocks=64)) as kv:
        yield kv
        assert kv.cache_stats()["cpu"]["num_locked"] == 0


def test_store_then_load_through_a_data_plane(kv: KVManager) -> None:
    caches = engine(1)
    plane = DataPlane(kv.tier_info(), EngineLayout.from_block_views(caches, layers=[0, 1]), kv.cache_config)
    tokens = np.random.default_rng(0).integers(0, 1000, size=5 * T + 3)
    src = [7, 3, 30, 12, 0]
    task, mask = kv.put_match(tokens)
    seq, host = kv.take_external(task)
    assert seq.tolist() == [0, 1, 2, 3, 4] and mask[: 5 * T].all()
    with pytest.raises(TaskError, match="launched before"):
        kv.launch(task, np.arange(5 * T))
    job = plane.submit("engine_to_host", [src[i] for i in seq], host)
    assert plane.poll(5_000_000) == [(job, "")]
    assert plane.poll(0) == [] and plane.copy.in_flight == 0  # each job is reported once
    with pytest.raises(IndexError, match="engine block id 99"):  # the registered layout checks the ids
        plane.submit("engine_to_host", [99], host[:1])
    assert kv.lookup(tokens) == (0, 0)  # not ready before the copy is reported
    kv.finish_external(task, True)
    assert kv.lookup(tokens)[0] == 5 * T

    dst = [1, 2, 4, 8, 16]
    for c in caches:
        c[dst] = float("nan")
    task, mask = kv.get_match(tokens)
    seq, host = kv.take_external(task)
    job = plane.submit("host_to_engine", [dst[i] for i in seq], host, urgent=True)
    assert plane.poll(5_000_000) == [(job, "")]
    kv.finish_external(task, True)
    want = engine(1)
    for c, w in zip(caches, want):
        assert torch.equal(c[dst].view(torch.int16), w[src].view(torch.int16))
    plane.close()


def test_a_failed_external_store_leaves_nothing_readable(kv: KVManager) -> None:
    tokens = np.arange(3 * T)
    task, _ = kv.put_match(tokens)
    kv.take_external(task)
    kv.finish_external(task, False, "worker gone")
    assert kv.lookup(tokens) == (0, 0)
    task, mask = kv.put_match(tokens)  # the blocks can be stored again
    assert mask.all()
    kv.take_external(task)
    kv.finish_external(task, True)
    assert kv.lookup(tokens)[0] == 3 * T


def test_external_task_errors(kv: KVManager) -> None:
    with pytest.raises(TaskError, match="unknown task id"):
        kv.finish_external(12345, True)
    task, _ = kv.get_match(np.arange(2 * T))  # nothing cached: complete at once
    assert [len(a) for a in kv.take_external(task)] == [0, 0]
    kv.finish_external(task, True)
    task, _ = kv.put_match(np.arange(2 * T))
    with pytest.raises(TaskError, match="not taken"):
        kv.finish_external(task, True)
    kv.cancel(task)


def test_a_data_plane_refuses_a_layout_of_another_size(kv: KVManager) -> None:
    small = [torch.zeros(B, 2, T, H, D // 2, dtype=torch.float16) for _ in range(L)]
    with pytest.raises(LayoutError, match="disagree on the model's KV shape"):
        DataPlane(kv.tier_info(), EngineLayout.from_block_views(small), kv.cache_config)


def store_external(kv: KVManager, plane: DataPlane, tokens: np.ndarray) -> None:
    task, _ = kv.put_match(tokens)
    seq, host = kv.take_external(task)
    plane.submit("engine_to_host", seq, host)
    plane.poll(5_000_000)
    kv.finish_external(task, True)


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


@pytest.mark.parametrize("timeout", [0.0, 20.0])
def test_external_loads_of_blocks_coming_up_from_ssd(tmp_path, timeout: float) -> None:
    """A get whose blocks are only on SSD: take_external waits for them (or, given no time, may hand out
    nothing); either way the task ends with every block unlocked and the index consistent."""
    model = ModelConfig(num_layers=L, num_kv_heads=H, head_size=D, dtype="float16")
    cfg = CacheConfig(tokens_per_block=T, num_cpu_blocks=16, enable_ssd=True, num_ssd_blocks=64,
                      ssd_cache_dir=str(tmp_path))
    tokens = np.random.default_rng(3).integers(0, 1000, size=6 * T)
    with KVManager(model, cfg) as kv:
        plane = DataPlane(kv.tier_info(), EngineLayout.from_block_views(engine(4)), kv.cache_config)
        store_external(kv, plane, tokens)
        wait_until(lambda: kv.lookup(tokens)[1] == 6 * T)  # written through to SSD
        for t in range(8):  # other prompts push the first out of the small CPU tier
            store_external(kv, plane, np.random.default_rng(100 + t).integers(0, 1000, size=4 * T))
        assert kv.lookup(tokens)[0] < 6 * T
        task, _ = kv.get_match(tokens)
        seq, host = kv.take_external(task, timeout=timeout)
        if len(seq):
            job = plane.submit("host_to_engine", seq + 10, host)
            assert plane.poll(5_000_000) == [(job, "")]
        kv.finish_external(task, True)
        wait_until(lambda: kv.cache_stats()["cpu"]["num_locked"] == 0)
        kv.control_plane.check_consistency()
        plane.close()
