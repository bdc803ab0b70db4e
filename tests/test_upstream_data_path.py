"""FlexKV driven as the original FlexKV's users and its test suite drive it, on CPU: its ModelConfig /
CacheConfig arguments (torch dtypes, kv_dim), its layouts registered through KVTPClient (LAYERFIRST, vLLM's packed
K|V heads, vLLM's 3-D MLA), its slot-mapping convention, SSD with a namespace, batched launches with its batch
handles, and reset() with pending tasks. Every loaded block is compared byte for byte with what was stored."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from upstream_helpers import LAYOUTS, OriginalEngine, original_slots

from flexkv.common.request import KVResponseStatus as S
from flexkv.core.errors import TaskError

T = 16  # upstream_helpers.CACHE["tokens_per_block"]
Factory = Callable[..., tuple[Any, OriginalEngine]]


def _tokens(gen: torch.Generator, blocks: int, extra: int = 0) -> torch.Tensor:
    return torch.randint(0, 100_000, (blocks * T + extra,), generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("layout_kind", LAYOUTS)
@pytest.mark.parametrize("model", [{}, {"dtype": torch.float32}], ids=["fp16", "fp32"])
def test_put_then_get_with_the_original_slot_convention(original_kv: Factory, gen: torch.Generator,
                                                        layout_kind: str, model: dict[str, Any]) -> None:
    kv, eng = original_kv(layout_kind, model=model)
    requests = [(_tokens(gen, 4), list(range(i * 4, i * 4 + 4))) for i in range(4)]
    stored = {}
    for tokens, blocks in requests:
        stored[tuple(blocks)] = eng.fill(blocks, gen)
        tid = kv.put_async(token_ids=tokens, slot_mapping=original_slots(blocks, T), token_mask=None)
        assert kv.wait([tid], completely=True)[tid].status is S.SUCCESS
        eng.clear(blocks)
    # a put shorter than a block stores nothing and fails nothing (the original's corner case)
    tid = kv.put_async(token_ids=_tokens(gen, 0, 8), slot_mapping=original_slots([0], T, 8), token_mask=None)
    assert kv.wait([tid], completely=True)[tid].status is S.SUCCESS
    for tokens, blocks in requests:
        dst = [b + 32 for b in blocks]
        tid, mask = kv.get_match(token_ids=tokens, token_mask=None)
        assert int(mask.sum()) == len(tokens)
        assert kv.launch(tid, original_slots(dst, T)) == [tid]
        res = kv.wait([tid], completely=True)[tid]
        assert res.status is S.SUCCESS and int(res.return_mask.sum()) == len(tokens)
        for b, want in zip(dst, stored[tuple(blocks)]):
            assert torch.equal(eng.block(b), want)


@pytest.mark.parametrize("layout_kind", LAYOUTS)
def test_ssd_tier_with_a_namespace(original_kv: Factory, gen: torch.Generator, layout_kind: str) -> None:
    # 8 CPU blocks, 40 stored: the early ones come back from SSD; another namespace never hits them.
    kv, eng = original_kv(layout_kind, cache={"enable_ssd": True, "num_cpu_blocks": 8, "num_ssd_blocks": 64})
    ns = ["test_namespace"]
    requests = [(_tokens(gen, 4), list(range(i * 4, i * 4 + 4))) for i in range(10)]
    stored = []
    for tokens, blocks in requests:
        stored.append(eng.fill(blocks, gen))
        tid = kv.put_async(token_ids=tokens, slot_mapping=original_slots(blocks, T), token_mask=None, namespace=ns)
        assert kv.wait([tid], completely=True)[tid].status is S.SUCCESS
    eng.clear(range(40))
    for (tokens, blocks), want in list(zip(requests, stored))[:3]:
        tid, mask = kv.get_match(token_ids=tokens, token_mask=None, namespace=["other"])
        assert not mask.any()
        kv.launch(tid, original_slots([], T))
        kv.wait([tid])
        tid, mask = kv.get_match(tokens, None, False, ns)  # the original's positional order: cpu_only third
        assert int(mask.sum()) == len(tokens)
        kv.launch(tid, original_slots(blocks, T))
        assert kv.wait([tid], completely=True)[tid].status is S.SUCCESS
        for b, w in zip(blocks, want):
            assert torch.equal(eng.block(b), w)


def test_cpu_only_matches_what_the_cpu_tier_holds(original_kv: Factory, gen: torch.Generator) -> None:
    kv, eng = original_kv(cache={"enable_ssd": True, "num_cpu_blocks": 4, "num_ssd_blocks": 64})
    old, new = _tokens(gen, 4), _tokens(gen, 4)
    for tokens, blocks in ((old, [0, 1, 2, 3]), (new, [4, 5, 6, 7])):
        eng.fill(blocks, gen)
        tid = kv.put_async(tokens, original_slots(blocks, T))
        assert kv.wait(tid, completely=True)[tid].ok
    tid, mask = kv.get_match(old, None, True)  # evicted from the CPU tier: only on SSD
    assert not mask.any()
    kv.cancel(tid)
    kv.wait(tid)
    tid, mask = kv.get_match(new, cpu_only=True)
    assert int(mask.sum()) == 4 * T
    kv.cancel(tid)
    kv.wait(tid)
    with pytest.raises(TaskError, match="cpu_only"):
        kv.get_match(new, None, "tenant-a")  # namespace is the fourth argument: by keyword


@pytest.mark.parametrize("kind", ["get", "put"])
def test_batched_launch_gives_one_handle(original_kv: Factory, gen: torch.Generator, kind: str) -> None:
    kv, eng = original_kv(cache={"num_cpu_blocks": 1024})
    pairs = [(_tokens(gen, 2), [2 * i, 2 * i + 1]) for i in range(4)]
    data = [eng.fill(blocks, gen) for _, blocks in pairs]
    if kind == "get":
        for tokens, blocks in pairs:
            tid = kv.put_async(tokens, original_slots(blocks, T))
            assert kv.wait(tid, completely=True)[tid].ok
        eng.clear(range(8))
    match = kv.get_match if kind == "get" else kv.put_match
    ids = [match(token_ids=tokens, token_mask=None)[0] for tokens, _ in pairs]
    launched = kv.launch(ids, [original_slots(blocks, T) for _, blocks in pairs], as_batch=True)
    assert len(launched) == 1 and launched[0] not in ids
    (batch,) = launched
    assert batch in kv.kv_task_engine.tasks and not set(ids) & set(kv.kv_task_engine.tasks)
    assert kv.wait([ids[0]], timeout=2.0)[ids[0]].status is S.NOTFOUND  # merged away
    res = kv.wait(batch, completely=True)[batch]
    assert res.status is S.SUCCESS and isinstance(res.return_mask, list) and len(res.return_mask) == 4
    assert all(int(m.sum()) == 2 * T for m in res.return_mask)
    assert torch.equal(res.get_mask(2), torch.from_numpy(res.return_mask[2]))  # the original's get_mask(idx)
    assert kv.wait(batch)[batch].status is S.NOTFOUND  # reported once
    assert not kv.kv_task_engine.tasks and not kv.kv_task_engine.graph_to_task
    if kind == "put":
        eng.clear(range(8))
        for tokens, blocks in pairs:
            tid, mask = kv.get_match(tokens)
            kv.launch(tid, original_slots(blocks, T))
            assert kv.wait(tid)[tid].ok
    for (_, blocks), want in zip(pairs, data):
        for b, w in zip(blocks, want):
            assert torch.equal(eng.block(b), w)


def test_single_task_or_mixed_kinds_stay_tasks(original_kv: Factory, gen: torch.Generator) -> None:
    kv, eng = original_kv()
    tokens = _tokens(gen, 2)
    eng.fill([0, 1], gen)
    tid, _ = kv.put_match(tokens)
    assert kv.launch([tid], [original_slots([0, 1], T)], as_batch=True) == [tid]  # one task: no batch
    assert kv.wait(tid)[tid].ok
    g, _ = kv.get_match(tokens)
    p, _ = kv.put_match(_tokens(gen, 1))
    assert kv.launch([g, p], [original_slots([2, 3], T), original_slots([4], T)], as_batch=True) == [g, p]
    res = kv.wait([g, p])
    assert res[g].ok and res[p].ok
    with pytest.raises(TaskError, match="swa_slot_mappings"):
        kv.launch(g, original_slots([2, 3], T), True)  # the third argument is swa_slot_mappings


def test_layerwise_batch_of_one_and_wait_layer(original_kv: Factory, gen: torch.Generator) -> None:
    kv, eng = original_kv()
    tokens = _tokens(gen, 2)
    want = eng.fill([0, 1], gen)
    tid = kv.put_async(tokens, original_slots([0, 1], T))
    assert kv.wait(tid)[tid].ok
    tid, _ = kv.get_match(tokens)
    (batch,) = kv.launch([tid], [original_slots([5, 6], T)], as_batch=True, layerwise_transfer=True)
    assert batch != tid
    assert all(kv.wait_layer(batch, layer) for layer in range(2))
    res = kv.wait(batch)[batch]
    assert res.ok and len(res.return_mask) == 1
    assert torch.equal(eng.block(5), want[0]) and torch.equal(eng.block(6), want[1])


def test_reset_after_put_clears_matches_and_cancels_pending(original_kv: Factory, gen: torch.Generator) -> None:
    kv, eng = original_kv()
    kv.reset()
    kv.reset()  # empty: cheap and idempotent
    tokens = _tokens(gen, 4)
    eng.fill(range(4), gen)
    tid = kv.put_async(tokens, original_slots(range(4), T))
    assert kv.wait(tid, completely=True)[tid].ok
    pending, before = kv.get_match(tokens)
    assert int(before.sum()) == 4 * T
    ids = [kv.get_match(tokens)[0], kv.put_match(_tokens(gen, 2))[0]]
    kv.reset()  # pending: one unlaunched get before, one get and one put: all end CANCELLED
    res = kv.wait([pending, *ids])
    assert all(r.status is S.CANCELLED for r in res.values())
    tid, after = kv.get_match(tokens)
    assert not after.any()
    kv.launch(tid, original_slots([], T))
    kv.wait(tid)
    stats = kv.cache_stats()["cpu"]
    assert stats["num_cached"] == 0 and stats["num_free"] == kv.cache_config.num_cpu_blocks
    mempool = kv.kv_task_engine.cache_engine.cpu_cache_engine.mempool  # the original's white-box view
    assert mempool.num_free_blocks == mempool.num_total_blocks == kv.cache_config.num_cpu_blocks


def test_reset_cancels_a_batch_whose_tasks_are_pending(original_kv: Factory, gen: torch.Generator) -> None:
    kv, eng = original_kv()
    pairs = [(_tokens(gen, 1), [i]) for i in range(3)]
    ids = [kv.put_match(tokens)[0] for tokens, _ in pairs]
    (batch,) = kv.launch(ids, [original_slots(b, T) for _, b in pairs], as_batch=True)
    kv.reset()
    res = kv.wait(batch)[batch]
    assert res.status is S.CANCELLED and len(res.return_mask) == 3


def test_waiting_on_a_merged_task_collects_it_for_its_batch(original_kv: Factory, gen: torch.Generator) -> None:
    # SGLang's layer-wise loads keep the task id they matched and sweep it with try_wait: it answers NOTFOUND
    # (merged away), and the control plane's report is kept for the batch, so nothing is left behind.
    kv, eng = original_kv()
    tokens = _tokens(gen, 2)
    want = eng.fill([0, 1], gen)
    tid = kv.put_async(tokens, original_slots([0, 1], T))
    assert kv.wait(tid)[tid].ok
    sub, _ = kv.get_match(tokens)
    (batch,) = kv.launch([sub], [original_slots([5, 6], T)], as_batch=True, layerwise_transfer=True)
    assert kv.wait_layer(batch, 1)
    for _ in range(200):
        assert kv.try_wait([sub])[sub].status is S.NOTFOUND
        if kv.control_plane.inspect(sub) is None:
            break
    assert kv.control_plane.inspect(sub) is None  # reported by the control plane, kept for the batch
    res = kv.wait(batch)[batch]
    assert res.ok and int(res.return_mask[0].sum()) == 2 * T
    assert torch.equal(eng.block(5), want[0]) and torch.equal(eng.block(6), want[1])
