"""KVManager's task API over the CPU tier: put / get round trips through match + launch and the async calls,
token masks, namespaces, prefetch and launch listeners.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv import KVCacheLayoutType
from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, VIEW_KINDS, KVEnv, S, wait_one

T = DEFAULT_CACHE["tokens_per_block"]


def test_put_then_get_round_trip_task_api(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T + 5)  # 4 whole blocks and a partial one
    src = [3, 9, 17, 40]
    data = eng.fill(src)
    eng.fill([41])  # the partial block's tokens live here in the engine

    tid, mask = kv.put_match(tokens)
    want = np.zeros(len(tokens), dtype=bool)
    want[: 4 * T] = True
    np.testing.assert_array_equal(mask, want)  # the trailing partial block is never stored
    assert env.locked() == 4
    assert kv.launch(tid, env.slots(src)) == [tid]
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS and res.error is None
    np.testing.assert_array_equal(res.return_mask, want)
    assert env.locked() == 0
    assert kv.cache_stats()["cpu"]["num_cached"] == 4

    # The same tokens again: nothing new; the task completes at once.
    tid2, mask2 = kv.put_match(tokens)
    assert not mask2.any()
    assert kv.launch(tid2, np.zeros(0, dtype=np.int64)) == [tid2]
    res2 = wait_one(kv, tid2)
    assert res2.status is S.SUCCESS
    assert not res2.return_mask.any() and len(res2.return_mask) == len(tokens)

    dst = [50, 7, 33, 62]
    eng.poison(dst + [63])
    tid3, mask3 = kv.get_match(tokens)
    np.testing.assert_array_equal(mask3, want)
    assert env.locked() == 4
    kv.launch(tid3, env.slots(dst))
    res3 = wait_one(kv, tid3)
    assert res3.status is S.SUCCESS
    np.testing.assert_array_equal(res3.return_mask, want)
    eng.assert_blocks(dst, data)
    assert eng.is_poisoned(63)
    # The source blocks were not touched by the load.
    eng.assert_blocks(src, data)

    stats = kv.cache_stats()
    assert stats["put_new_tokens"] == 4 * T
    assert stats["get_hit_tokens"] == 4 * T
    assert stats["hit_rate"] == 1.0


def test_launch_listeners_hear_every_successful_launch(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    heard: list[tuple[list[int], bool, int]] = []
    kv.add_launch_listener(lambda ids, layerwise, counter: heard.append((ids, layerwise, counter)))
    kv.add_launch_listener(lambda *_: 1 / 0)  # a failing listener is logged; the launch stands
    tokens = env.tokens(2 * T)
    eng.fill([1, 2])
    tid, _ = kv.put_match(tokens)
    kv.launch(tid, env.slots([1, 2]))
    assert wait_one(kv, tid).status is S.SUCCESS
    tid2, _ = kv.get_match(tokens)
    (batch,) = kv.launch([tid2], [env.slots([5, 6])], as_batch=True, layerwise_transfer=True, counter_id=2)
    assert batch != tid2  # a layer-wise launch with as_batch becomes one batch task, as in the original FlexKV
    assert wait_one(kv, batch).status is S.SUCCESS
    tid3, _ = kv.get_match(tokens)
    with pytest.raises(TaskError):
        kv.launch(tid3, env.slots([5]))  # a refused launch is not heard
    assert heard == [([tid], False, 0), ([tid2], True, 2)]
    assert env.locked() == 0  # the refused launch ended its task and unlocked its blocks


def test_put_then_get_round_trip_async(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(3 * T + 7)
    src = [5, 6, 20]
    data = eng.fill(src)
    put_slots = np.concatenate([env.slots(src), env.partial_slots(21, 7)])
    tid = kv.put_async(tokens, put_slots)
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    want = np.zeros(len(tokens), dtype=bool)
    want[: 3 * T] = True
    np.testing.assert_array_equal(res.return_mask, want)

    dst = [60, 2, 44]
    eng.poison(dst + [45])
    get_slots = np.concatenate([env.slots(dst), env.partial_slots(45, 7)])
    tid = kv.get_async(tokens, torch.from_numpy(get_slots))  # engines pass torch tensors
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    np.testing.assert_array_equal(res.return_mask, want)
    eng.assert_blocks(dst, data)
    assert eng.is_poisoned(45)  # the trailing partial block's slots were not written


@pytest.mark.parametrize("kind", [*KVCacheLayoutType, *VIEW_KINDS], ids=lambda k: getattr(k, "value", k))
def test_round_trip_every_layout(make_kv, kind: KVCacheLayoutType | str) -> None:
    env = make_kv(engine=kind)
    tokens = env.tokens(5 * T)
    src = [0, 63, 31, 32, 8]
    data = env.put(tokens, src)
    env.get_and_check(tokens, [12, 1, 62, 30, 9], data)


def test_get_hits_only_the_cached_prefix(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T)
    data = env.put(tokens[: 2 * T], [0, 1])
    dst = [10, 11, 12, 13]
    eng.poison(dst)
    tid, mask = kv.get_match(tokens)
    want = np.zeros(len(tokens), dtype=bool)
    want[: 2 * T] = True
    np.testing.assert_array_equal(mask, want)
    kv.launch(tid, env.slots(dst[:2]))
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    eng.assert_blocks(dst[:2], data)
    assert eng.is_poisoned(12) and eng.is_poisoned(13)

    # A sequence that differs in block 0 shares nothing (keys chain the whole prefix).
    other = tokens.copy()
    other[3] += 1
    tid, mask = kv.get_match(other)
    assert not mask.any()
    assert wait_one(kv, tid).status is S.SUCCESS


def test_put_skips_cached_blocks(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T)
    first = env.put(tokens[: 2 * T], [0, 1])
    src = [2, 3, 4, 5]
    rest = eng.fill(src)
    tid, mask = kv.put_match(tokens)
    want = np.zeros(len(tokens), dtype=bool)
    want[2 * T:] = True
    np.testing.assert_array_equal(mask, want)
    kv.launch(tid, env.slots(src[2:]))  # only the slots of the tokens the mask marks
    assert wait_one(kv, tid).status is S.SUCCESS
    env.get_and_check(tokens, [20, 21, 22, 23], first + rest[2:])


@pytest.mark.parametrize("prefix", [2 * T, T + 4, 1, 3 * T - 1])
def test_get_match_with_false_prefix(env: KVEnv, prefix: int) -> None:
    """The get loads the blocks from the first True token's block on; the mask says so."""
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T + 3)
    data = env.put(tokens[: 4 * T], [0, 1, 2, 3])
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[prefix:] = True
    first_block = prefix // T
    dst = [40, 41, 42, 43]
    eng.poison(dst)
    tid, mask = kv.get_match(tokens, token_mask=token_mask)
    want = np.zeros(len(tokens), dtype=bool)
    want[first_block * T: 4 * T] = True
    np.testing.assert_array_equal(mask, want)
    assert env.locked() == 4 - first_block  # the blocks the engine already has are not kept locked
    kv.launch(tid, env.slots(dst[first_block:]))
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    np.testing.assert_array_equal(res.return_mask, want)
    eng.assert_blocks(dst[first_block:], data[first_block:])
    for b in dst[:first_block]:
        assert eng.is_poisoned(b)


def test_get_match_with_all_false_mask_loads_nothing(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(3 * T)
    env.put(tokens, [0, 1, 2])
    tid, mask = kv.get_match(tokens, token_mask=np.zeros(len(tokens), dtype=bool))
    assert not mask.any()
    assert env.locked() == 0
    assert kv.launch(tid, np.zeros(0, dtype=np.int64)) == [tid]
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS and not res.return_mask.any()


@pytest.mark.parametrize("prefix", [2 * T, T + 4], ids=["block_aligned", "mid_block"])
def test_get_async_with_false_prefix(env: KVEnv, prefix: int) -> None:
    """slot_mapping holds the slots of the tokens token_mask marks; the get loads the blocks from the
    first True token's block on. A prefix that ends mid-block still has its block loaded whole: the slots
    of that block's leading tokens follow from the first marked slot (a block's slots are consecutive)."""
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T + 5)
    data = env.put(tokens[: 4 * T], [0, 1, 2, 3])
    first_block = prefix // T
    dst = [30, 31, 32, 33]
    eng.poison(dst + [34])
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[prefix:] = True
    all_slots = np.concatenate([env.slots(dst), env.partial_slots(34, 5)])
    tid = kv.get_async(tokens, all_slots[prefix:], token_mask=token_mask)
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS, res
    want = np.zeros(len(tokens), dtype=bool)
    want[first_block * T: 4 * T] = True
    np.testing.assert_array_equal(res.return_mask, want)
    eng.assert_blocks(dst[first_block:], data[first_block:])
    for b in dst[:first_block] + [34]:
        assert eng.is_poisoned(b)


@pytest.mark.parametrize("prefix", [T, T + 4], ids=["block_aligned", "mid_block"])
def test_put_async_with_false_prefix(env: KVEnv, prefix: int) -> None:
    """A put with a False prefix stores the blocks from the first True token's block on, given that the
    blocks before it are cached; slot_mapping holds the slots of the tokens token_mask marks."""
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * T)
    head = env.put(tokens[:T], [0])
    src = [0, 1, 2, 3]
    rest = eng.fill(src[1:])
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[prefix:] = True
    tid = kv.put_async(tokens, env.slots(src)[prefix:], token_mask=token_mask)
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS, res
    want = np.zeros(len(tokens), dtype=bool)
    want[T:] = True
    np.testing.assert_array_equal(res.return_mask, want)
    env.get_and_check(tokens, [50, 51, 52, 53], head + rest)


def test_put_with_false_prefix_over_uncached_blocks_stores_nothing(env: KVEnv) -> None:
    """Blocks before the mask must be cached: the new blocks hang off them. If they are not, nothing is stored."""
    kv = env.kv
    tokens = env.tokens(4 * T)
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[2 * T:] = True
    tid, mask = kv.put_match(tokens, token_mask=token_mask)
    assert not mask.any()
    assert env.locked() == 0
    kv.launch(tid, np.zeros(0, dtype=np.int64))
    assert wait_one(kv, tid).status is S.SUCCESS
    tid, mask = kv.get_match(tokens)
    assert not mask.any()
    wait_one(kv, tid)
    # The whole sequence can still be stored afterwards.
    data = env.put(tokens, [4, 5, 6, 7])
    env.get_and_check(tokens, [8, 9, 10, 11], data)


def test_namespaces_do_not_share_blocks(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [0, 1], namespace="tenant-a")
    tid, mask = kv.get_match(tokens, namespace="tenant-b")
    assert not mask.any()
    wait_one(kv, tid)
    tid, mask = kv.get_match(tokens)
    assert not mask.any()
    wait_one(kv, tid)
    env.get_and_check(tokens, [2, 3], data, namespace="tenant-a")


def test_prefetch_completes_at_once(env: KVEnv) -> None:
    tokens = env.tokens(2 * T)
    env.put(tokens, [0, 1])
    tid = env.kv.prefetch_async(tokens)
    res = wait_one(env.kv, tid)
    assert res.status is S.SUCCESS
    assert env.locked() == 0
