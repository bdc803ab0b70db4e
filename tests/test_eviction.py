"""Eviction under pressure: LRU, never a locked block, evict_ratio frees extra in one go."""

from __future__ import annotations

import numpy as np
import torch

from flexkv import CacheConfig, KVCacheLayout, KVCacheLayoutType, KVManager, ModelConfig

from kv_helpers import assert_no_locks, bitwise_equal, poison, random_tokens, slots_for, store

TPB, ENGINE_BLOCKS = 16, 64


def make(cpu_blocks: int, evict_ratio: float = 0.0):
    model = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)
    kv = KVManager(model, CacheConfig(num_cpu_blocks=cpu_blocks, tokens_per_block=TPB, evict_ratio=evict_ratio))
    kv.start()
    caches = [torch.randn(2, ENGINE_BLOCKS, TPB, 2, 8, dtype=torch.float16) for _ in range(2)]
    kv.register_kv_caches(caches, KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, ENGINE_BLOCKS, TPB, 2, 8))
    return kv, caches


def test_locked_blocks_survive_pressure_and_load_byte_exact() -> None:
    kv, caches = make(cpu_blocks=16)
    rng = np.random.default_rng(7)
    try:
        held = random_tokens(rng, 8 * TPB)
        store(kv, held, range(8))
        want = [c[:, 0:8].clone() for c in caches]
        task_id, mask = kv.get_match(held)  # locks all 8 blocks until the load ends
        assert mask.sum() == 8 * TPB
        for round_ in range(6):  # 6 x 8 new blocks through the 8 blocks left
            for c in caches:
                c[:, 8:16] = torch.randn(2, 8, TPB, 2, 8, dtype=torch.float16)
            put_mask = store(kv, random_tokens(rng, 8 * TPB), range(8, 16))
            assert put_mask.sum() == 8 * TPB, round_
        assert kv.cache_stats()["cpu"]["evicted"] >= 40
        poison(caches)
        kv.launch(task_id, slots_for(mask, range(20, 28), TPB))
        assert kv.wait(task_id)[task_id].ok
        for w, c in zip(want, caches):
            assert bitwise_equal(w, c[:, 20:28])
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_a_put_that_cannot_get_blocks_stores_a_prefix_and_counts_the_rest() -> None:
    kv, caches = make(cpu_blocks=8)
    rng = np.random.default_rng(8)
    try:
        held = random_tokens(rng, 6 * TPB)
        store(kv, held, range(6))
        task_id, _ = kv.get_match(held)  # 6 of 8 blocks locked
        put_mask = store(kv, random_tokens(rng, 5 * TPB), range(10, 15))
        assert put_mask.sum() == 2 * TPB and put_mask[: 2 * TPB].all()
        assert kv.cache_stats()["put_dropped_tokens"] == 3 * TPB
        kv.cancel(task_id)
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_least_recently_used_goes_first() -> None:
    kv, _ = make(cpu_blocks=12)
    rng = np.random.default_rng(9)
    try:
        a, b, c = (random_tokens(rng, 4 * TPB) for _ in range(3))
        store(kv, a, range(4))
        store(kv, b, range(4, 8))
        store(kv, c, range(8, 12))
        tid, _ = kv.get_match(a)  # a is now the most recently used
        kv.cancel(tid)
        store(kv, random_tokens(rng, 4 * TPB), range(12, 16))  # evicts b, the oldest
        hits = {}
        for name, seq in (("a", a), ("b", b), ("c", c)):
            tid, m = kv.get_match(seq)
            hits[name] = int(m.sum()) // TPB
            kv.cancel(tid)
        assert hits == {"a": 4, "b": 0, "c": 4}
    finally:
        kv.shutdown()


def test_evict_ratio_frees_extra_blocks_at_once() -> None:
    kv, _ = make(cpu_blocks=20, evict_ratio=0.25)  # 5 extra blocks per eviction
    rng = np.random.default_rng(10)
    try:
        for i in range(5):
            store(kv, random_tokens(rng, 4 * TPB), range(4 * i, 4 * i + 4))
        assert kv.cache_stats()["cpu"]["num_free"] == 0
        store(kv, random_tokens(rng, 1 * TPB), [30])  # needs 1, frees 1 + 5
        stats = kv.cache_stats()["cpu"]
        assert stats["evicted"] == 6 and stats["num_free"] == 5
    finally:
        kv.shutdown()


def test_a_put_whose_prefix_is_not_cached_evicts_nothing_and_stores_nothing() -> None:
    """Storing the tail of a sequence whose head was evicted must not wipe the cache for nothing."""
    kv, _ = make(cpu_blocks=8)
    rng = np.random.default_rng(11)
    try:
        a = random_tokens(rng, 8 * TPB)
        store(kv, a, range(8))
        b = random_tokens(rng, 8 * TPB)
        token_mask = np.zeros(len(b), dtype=bool)
        token_mask[6 * TPB:] = True  # the engine only has blocks 6 and 7 to give
        task_id, mask = kv.put_match(b, token_mask)
        assert not mask.any()
        assert kv.wait(task_id)[task_id].ok
        stats = kv.cache_stats()
        assert stats["cpu"]["evicted"] == 0 and stats["put_no_prefix_tokens"] == 2 * TPB
        tid, hit = kv.get_match(a)
        assert hit.sum() == 8 * TPB  # a is untouched
        kv.cancel(tid)
        assert_no_locks(kv)
    finally:
        kv.shutdown()
