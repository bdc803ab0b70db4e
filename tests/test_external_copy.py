"""Copies made by another process's data plane: the KVManager plans and ends the tasks
(take_external / finish_external), a DataPlane maps the CPU tier by name and moves the bytes, as vLLM's
worker process does for the scheduler's KVManager. Engine data is fresh random bytes; destinations are
poisoned first."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flexkv.core.data_plane import DataPlane
from flexkv.core.errors import LayoutError, TaskError
from flexkv.core.layout import EngineLayout

from kv_helpers import KVEnv

T, B = 16, 32  # tokens per block, engine blocks


@pytest.fixture
def make_env(make_kv):
    """A manager whose engine memory the test's DataPlane moves (so not registered with the manager): per layer
    [blocks, k|v, tokens, heads, dim], as vLLM's worker registers it."""
    def make(**overrides) -> KVEnv:
        overrides.setdefault("num_cpu_blocks", 64)
        return make_kv(engine="layerblock", engine_blocks=B, register=False, head_size=16, **overrides)
    return make


def data_plane(env: KVEnv) -> DataPlane:
    views = EngineLayout.from_block_views(env.eng.tensors, layers=[0, 1])
    return DataPlane(env.kv.tier_info(), views, env.kv.cache_config)


def test_store_then_load_through_a_data_plane(make_env) -> None:
    env = make_env()
    kv, eng = env.kv, env.eng
    data = eng.fill(range(B))
    plane = data_plane(env)
    tokens = env.tokens(5 * T + 3)
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
    eng.poison(dst)
    task, mask = kv.get_match(tokens)
    seq, host = kv.take_external(task)
    job = plane.submit("host_to_engine", [dst[i] for i in seq], host, urgent=True)
    assert plane.poll(5_000_000) == [(job, "")]
    kv.finish_external(task, True)
    eng.assert_blocks(dst, [data[s] for s in src])
    eng.assert_blocks(src, [data[s] for s in src])  # the sources were only read
    plane.close()


def test_a_failed_external_store_leaves_nothing_readable(make_env) -> None:
    kv = make_env().kv
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


def test_external_task_errors(make_env) -> None:
    kv = make_env().kv
    with pytest.raises(TaskError, match="unknown task id"):
        kv.finish_external(12345, True)
    task, _ = kv.get_match(np.arange(2 * T))  # nothing cached: complete at once
    assert [len(a) for a in kv.take_external(task)] == [0, 0]
    kv.finish_external(task, True)
    task, _ = kv.put_match(np.arange(2 * T))
    with pytest.raises(TaskError, match="not taken"):
        kv.finish_external(task, True)
    kv.cancel(task)


def test_a_data_plane_refuses_a_layout_of_another_size(make_env) -> None:
    kv = make_env().kv
    small = [torch.zeros(B, 2, T, 2, 8, dtype=torch.float16) for _ in range(2)]
    with pytest.raises(LayoutError, match="disagree on the model's KV shape"):
        DataPlane(kv.tier_info(), EngineLayout.from_block_views(small), kv.cache_config)


def store_external(kv, plane: DataPlane, tokens: np.ndarray, engine_blocks) -> None:
    task, _ = kv.put_match(tokens)
    seq, host = kv.take_external(task)
    job = plane.submit("engine_to_host", np.asarray(engine_blocks)[seq], host)
    assert plane.poll(5_000_000) == [(job, "")]
    kv.finish_external(task, True)


def wait_until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


@pytest.mark.parametrize("timeout", [0.0, 20.0])
def test_external_loads_of_blocks_coming_up_from_ssd(make_env, timeout: float) -> None:
    """A get whose blocks are only on SSD: take_external waits for them (given no time, it may hand out
    nothing, or a prefix); what it hands out loads byte-exact, and the task ends with every block unlocked and
    the index consistent (checked by make_kv)."""
    env = make_env(num_cpu_blocks=16, ssd=True)
    kv, eng = env.kv, env.eng
    data = eng.fill(range(B))
    plane = data_plane(env)
    tokens = env.tokens(6 * T)
    store_external(kv, plane, tokens, range(6))
    wait_until(lambda: kv.lookup(tokens)[1] == 6 * T)  # written through to SSD
    for _ in range(8):  # other prompts push the first out of the small CPU tier
        store_external(kv, plane, env.tokens(4 * T), range(6, 10))
    assert kv.lookup(tokens)[0] < 6 * T
    eng.poison(range(10, 16))
    task, _ = kv.get_match(tokens)
    seq, host = kv.take_external(task, timeout=timeout)
    assert seq.tolist() == list(range(len(seq)))  # a prefix of the sequence, in order
    if timeout:
        assert len(seq) == 6  # given time, every block came up
    if len(seq):
        job = plane.submit("host_to_engine", seq + 10, host)
        assert plane.poll(5_000_000) == [(job, "")]
    kv.finish_external(task, True)
    eng.assert_blocks(range(10, 10 + len(seq)), data[: len(seq)])
    eng.assert_poisoned(range(10 + len(seq), 16))
    wait_until(lambda: kv.cache_stats()["cpu"]["num_locked"] == 0)
    plane.close()


def test_a_layerwise_load_completes_layer_by_layer(make_env) -> None:
    """submit_layers: one copy per layer group on the host (vLLM's layer-wise loads on its CPU backend); after
    wait_layer_jobs(layer) that layer of every block is in place; poll reports each job once."""
    env = make_env()
    kv, eng = env.kv, env.eng
    data = eng.fill(range(B))
    plane = data_plane(env)
    tokens = env.tokens(4 * T)
    src, dst = [5, 6, 7, 8], [20, 21, 22, 23]
    task, _ = kv.put_match(tokens)
    seq, host = kv.take_external(task)
    plane.submit("engine_to_host", [src[i] for i in seq], host)
    plane.poll(5_000_000)
    kv.finish_external(task, True)

    eng.poison(dst)
    task, _ = kv.get_match(tokens)
    seq, host = kv.take_external(task)
    jobs = plane.submit_layers("host_to_engine", [dst[i] for i in seq], host)
    assert len(set(jobs.jobs)) == 2 and jobs.groups.tolist() == [0, 1]  # one copy per layer
    for layer in (1, 0):
        plane.wait_layer_jobs(jobs, layer)
        assert torch.equal(eng.tensors[layer][dst].view(torch.int16), eng.tensors[layer][src].view(torch.int16))
    done: list[tuple[int, str]] = []
    deadline = time.monotonic() + 5
    while len(done) < 2 and time.monotonic() < deadline:
        done += plane.poll(100_000)
    assert sorted(done) == sorted((job, "") for job in jobs.jobs)
    kv.finish_external(task, True)
    eng.assert_blocks(dst, [data[s] for s in src])
    plane.close()
