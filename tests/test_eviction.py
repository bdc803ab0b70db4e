"""Eviction under pressure: LRU, never a locked block, evict_ratio frees extra in one go."""

from __future__ import annotations

import numpy as np

from kv_helpers import S, assert_clean, hit_tokens, slots_for, store, wait_one

TPB = 16  # the default tokens_per_block
T = TPB  # its name in the test moved here from the task API tests


def test_locked_blocks_survive_pressure_and_load_byte_exact(make_kv) -> None:
    env = make_kv(num_cpu_blocks=16)
    kv, eng = env.kv, env.eng
    held = env.tokens(8 * TPB)
    want = env.put(held, range(8))
    task_id, mask = kv.get_match(held)  # locks all 8 blocks until the load ends
    assert mask.sum() == 8 * TPB
    for round_ in range(6):  # 6 x 8 new blocks through the 8 blocks left
        eng.fill(range(8, 16))
        put_mask = store(kv, env.tokens(8 * TPB), range(8, 16))
        assert put_mask.sum() == 8 * TPB, round_
    assert kv.cache_stats()["cpu"]["evicted"] >= 40
    eng.poison()
    kv.launch(task_id, slots_for(mask, range(20, 28), TPB))
    assert kv.wait(task_id)[task_id].ok
    eng.assert_blocks(range(20, 28), want)
    eng.assert_poisoned([28])


def test_a_put_that_cannot_get_blocks_stores_a_prefix_and_counts_the_rest(make_kv) -> None:
    env = make_kv(num_cpu_blocks=8)
    kv = env.kv
    held = env.tokens(6 * TPB)
    env.put(held, range(6))
    task_id, _ = kv.get_match(held)  # 6 of 8 blocks locked
    env.eng.fill(range(10, 15))
    put_mask = store(kv, env.tokens(5 * TPB), range(10, 15))
    assert put_mask.sum() == 2 * TPB and put_mask[: 2 * TPB].all()
    assert kv.cache_stats()["put_dropped_tokens"] == 3 * TPB
    kv.cancel(task_id)
    assert kv.wait(task_id)[task_id].status.value == "cancelled"


def test_least_recently_used_goes_first(make_kv) -> None:
    env = make_kv(num_cpu_blocks=12)
    kv = env.kv
    a, b, c = (env.tokens(4 * TPB) for _ in range(3))
    env.put(a, range(4))
    env.put(b, range(4, 8))
    env.put(c, range(8, 12))
    assert hit_tokens(kv, a) == 4 * TPB  # a is now the most recently used
    env.put(env.tokens(4 * TPB), range(12, 16))  # evicts b, the oldest
    hits = {name: hit_tokens(kv, seq) // TPB for name, seq in (("a", a), ("b", b), ("c", c))}
    assert hits == {"a": 4, "b": 0, "c": 4}


def test_evict_ratio_frees_extra_blocks_at_once(make_kv) -> None:
    env = make_kv(num_cpu_blocks=20, evict_ratio=0.25)  # 5 extra blocks per eviction
    kv = env.kv
    for i in range(5):
        env.put(env.tokens(4 * TPB), range(4 * i, 4 * i + 4))
    assert kv.cache_stats()["cpu"]["num_free"] == 0
    env.put(env.tokens(1 * TPB), [30])  # needs 1, frees 1 + 5
    stats = kv.cache_stats()["cpu"]
    assert stats["evicted"] == 6 and stats["num_free"] == 5


def test_a_put_whose_prefix_is_not_cached_evicts_nothing_and_stores_nothing(make_kv) -> None:
    """Storing the tail of a sequence whose head was evicted must not wipe the cache for nothing."""
    env = make_kv(num_cpu_blocks=8)
    kv = env.kv
    a = env.tokens(8 * TPB)
    data = env.put(a, range(8))
    b = env.tokens(8 * TPB)
    token_mask = np.zeros(len(b), dtype=bool)
    token_mask[6 * TPB:] = True  # the engine only has blocks 6 and 7 to give
    task_id, mask = kv.put_match(b, token_mask)
    assert not mask.any()
    assert kv.wait(task_id)[task_id].ok
    stats = kv.cache_stats()
    assert stats["cpu"]["evicted"] == 0 and stats["put_no_prefix_tokens"] == 2 * TPB
    env.get_and_check(a, list(range(10, 18)), data)  # a is untouched, byte for byte


def test_eviction_keeps_loaded_data_exact(make_kv) -> None:
    env = make_kv(num_cpu_blocks=16)
    kv, eng = env.kv, env.eng
    seqs = []
    for _ in range(10):  # 30 blocks into a 16-block tier
        tokens = env.tokens(3 * T)
        seqs.append((tokens, env.put(tokens, [0, 1, 2])))
        assert_clean(kv)
    stats = kv.cache_stats()["cpu"]
    assert stats["evicted"] >= 14
    assert stats["num_cached"] <= 16
    hits = []
    dst = [20, 21, 22]
    for tokens, data in seqs:
        eng.poison(dst)
        tid, mask = kv.get_match(tokens)
        hit = int(mask.sum()) // T
        assert mask[: hit * T].all() and not mask[hit * T:].any()
        kv.launch(tid, env.slots(dst[:hit]))
        assert wait_one(kv, tid).status is S.SUCCESS
        eng.assert_blocks(dst[:hit], data[:hit])
        hits.append(hit)
    assert hits[-1] == 3  # the newest sequence is whole
    assert sum(hits) <= 16
