"""KVManager's task API over the CPU tier: masks, wait / try_wait / cancel semantics, reset, shutdown, threads.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from flexkv import KVCacheLayoutType, KVManager, KVResponseStatus
from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, VIEW_KINDS, KVEnv, assert_clean, gated

T = DEFAULT_CACHE["tokens_per_block"]
NUM_CPU_BLOCKS = DEFAULT_CACHE["num_cpu_blocks"]

S = KVResponseStatus


def wait_one(kv: KVManager, tid: int, timeout: float = 20.0):
    res = kv.wait(tid, timeout=timeout)
    assert set(res) == {tid}
    return res[tid]


# --------------------------------------------------------------------------------------------- round trips


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
    kv.launch([tid2], [env.slots([5, 6])], as_batch=True, layerwise_transfer=True, counter_id=2)
    assert wait_one(kv, tid2).status is S.SUCCESS
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


# --------------------------------------------------------------------------------------------- wait


def test_wait_notfound_for_unknown_and_already_reported(env: KVEnv) -> None:
    kv = env.kv
    assert wait_one(kv, 987654).status is S.NOTFOUND
    tokens = env.tokens(2 * T)
    env.eng.fill([0, 1])
    tid = kv.put_async(tokens, env.slots([0, 1]))
    assert wait_one(kv, tid).status is S.SUCCESS
    again = wait_one(kv, tid, timeout=0.1)
    assert again.status is S.NOTFOUND and again.return_mask is None
    assert kv.try_wait(tid)[tid].status is S.NOTFOUND


def test_wait_unready_for_unlaunched_task(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [0, 1])
    tid, _ = kv.get_match(tokens)
    t0 = time.monotonic()
    res = wait_one(kv, tid, timeout=5.0)
    assert res.status is S.UNREADY
    assert time.monotonic() - t0 < 2.0  # an unlaunched task cannot finish: wait does not sit out the timeout
    assert kv.try_wait(tid)[tid].status is S.UNREADY
    assert env.locked() == 2  # still matched and locked; UNREADY did not consume it
    eng.poison([5, 6])
    kv.launch(tid, env.slots([5, 6]))
    assert wait_one(kv, tid).status is S.SUCCESS
    eng.assert_blocks([5, 6], data)


def test_try_wait_reports_a_finished_task_once(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.eng.fill([0, 1])
    tid = kv.put_async(tokens, env.slots([0, 1]))
    deadline = time.monotonic() + 20
    got = {}
    while tid not in got and time.monotonic() < deadline:
        got = kv.try_wait([tid])
        if tid not in got:
            time.sleep(0.001)
    assert got[tid].status is S.SUCCESS
    assert got[tid].return_mask.all()
    assert kv.try_wait([tid])[tid].status is S.NOTFOUND


def test_running_task_times_out_and_try_wait_leaves_it_out(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(3 * T)
    data = env.put(tokens, [0, 1, 2])
    dst = [10, 11, 12]
    eng.poison(dst)
    with gated(kv) as g:
        tid, _ = kv.get_match(tokens)
        kv.launch(tid, env.slots(dst))
        t0 = time.monotonic()
        res = wait_one(kv, tid, timeout=0.2)
        assert res.status is S.TIMEOUT
        assert time.monotonic() - t0 >= 0.15  # it did wait for the timeout
        assert kv.try_wait([tid]) == {}
        assert wait_one(kv, tid, timeout=0).status is S.TIMEOUT  # a TIMEOUT does not forget the task
        kv.cancel(tid)  # a running task cannot be cancelled: it completes normally
        assert env.locked() == 3
        g.gate.set()
        res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    assert res.return_mask.all()
    eng.assert_blocks(dst, data)
    assert wait_one(kv, tid, timeout=0).status is S.NOTFOUND


def test_wait_for_several_tasks(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    a, b = env.tokens(2 * T), env.tokens(T + 3)
    eng.fill([0, 1, 2])
    ta = kv.put_async(a, env.slots([0, 1]))
    tb = kv.put_async(b, np.concatenate([env.slots([2]), env.partial_slots(3, 3)]))
    unknown = 10**6
    res = kv.wait([ta, tb, unknown])
    assert set(res) == {ta, tb, unknown}
    assert res[ta].status is S.SUCCESS and res[ta].return_mask.sum() == 2 * T
    assert res[tb].status is S.SUCCESS and res[tb].return_mask.sum() == T
    assert res[unknown].status is S.NOTFOUND


def test_wait_with_a_repeated_id_still_reports_the_task(env: KVEnv) -> None:
    """A finished task is reported once: an id given twice in one wait() must not turn its result into
    NOTFOUND (the second lookup must not overwrite the first)."""
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.eng.fill([0, 1])
    tid = kv.put_async(tokens, env.slots([0, 1]))
    res = kv.wait([tid, tid])
    assert res[tid].status is S.SUCCESS, res


def test_return_mask_is_not_changed_by_the_caller_editing_the_match_mask(env: KVEnv) -> None:
    """wait() reports the tokens the task moved; the caller editing the array get_match / put_match gave it
    (engines reuse or clear such arrays) must not change that report, nor the copy."""
    kv, eng = env.kv, env.eng
    tokens = env.tokens(2 * T)
    src = [0, 1]
    data = eng.fill(src)
    tid, mask = kv.put_match(tokens)
    want = mask.copy()
    assert want.all()
    mask[:] = False
    kv.launch(tid, env.slots(src))
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    np.testing.assert_array_equal(res.return_mask, want)

    dst = [2, 3]
    eng.poison(dst)
    tid, mask = kv.get_match(tokens)
    mask[:T] = False
    kv.launch(tid, env.slots(dst))
    res = wait_one(kv, tid)
    assert res.status is S.SUCCESS
    np.testing.assert_array_equal(res.return_mask, want)
    eng.assert_blocks(dst, data)


# --------------------------------------------------------------------------------------------- cancel


def test_cancel_unlaunched_get_unlocks_its_blocks(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(3 * T)
    data = env.put(tokens, [0, 1, 2])
    tid, mask = kv.get_match(tokens)
    assert mask.sum() == 3 * T
    ids = env.host_ids(tid)
    assert len(ids) == 3
    assert [env.lock_count(i) for i in ids] == [1, 1, 1]
    assert env.locked() == 3
    kv.cancel(tid)
    assert [env.lock_count(i) for i in ids] == [0, 0, 0]
    assert env.locked() == 0
    assert all(env.is_ready(i) for i in ids)  # a cancelled get leaves the data cached
    res = wait_one(kv, tid)
    assert res.status is S.CANCELLED
    with pytest.raises(TaskError, match=str(tid)):
        kv.launch(tid, env.slots([5, 6, 7]))  # it is forgotten now
    assert kv.cache_stats()["tasks_cancelled"] == 1
    env.get_and_check(tokens, [5, 6, 7], data)


def test_cancel_then_launch_is_refused(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.put(tokens, [0, 1])
    tid, _ = kv.get_match(tokens)
    kv.cancel([tid])
    with pytest.raises(TaskError, match=str(tid)):
        kv.launch(tid, env.slots([5, 6]))
    assert wait_one(kv, tid).status is S.CANCELLED


def test_cancel_unlaunched_put_leaves_blocks_unreadable_until_rewritten(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(3 * T + 2)
    eng.fill([0, 1, 2])
    tid, mask = kv.put_match(tokens)
    assert mask.sum() == 3 * T
    ids = env.host_ids(tid)
    assert env.locked() == 3
    kv.cancel(tid)
    assert env.locked() == 0
    assert not any(env.is_ready(i) for i in ids)
    assert wait_one(kv, tid).status is S.CANCELLED

    tid, mask = kv.get_match(tokens)
    assert not mask.any()  # nothing readable
    assert wait_one(kv, tid).status is S.SUCCESS

    # A later put offers the blocks again and they can be stored and loaded byte-exact.
    data = env.put(tokens[: 3 * T], [3, 4, 5])
    env.get_and_check(tokens, [6, 7, 8], data)


def test_cancel_unknown_or_finished_task_is_a_no_op(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.eng.fill([0, 1])
    tid = kv.put_async(tokens, env.slots([0, 1]))
    res_before = kv.wait(tid)[tid]
    assert res_before.status is S.SUCCESS
    kv.cancel([tid, 424242])
    tid2, mask = kv.get_match(tokens)
    assert mask.all()
    kv.launch(tid2, env.slots([2, 3]))
    assert wait_one(kv, tid2).status is S.SUCCESS
    kv.cancel(tid2)  # already reported
    assert kv.cache_stats()["tasks_cancelled"] == 0


def test_cancel_several_tasks_at_once(env: KVEnv) -> None:
    kv = env.kv
    a, b = env.tokens(2 * T), env.tokens(2 * T)
    env.put(a, [0, 1])
    ta, _ = kv.get_match(a)
    tb, _ = kv.get_match(a)  # the same blocks, locked twice
    tp, _ = kv.put_match(b)
    assert env.locked() == 4
    assert env.lock_count(env.host_ids(ta)[0]) == 2
    kv.cancel(np.array([ta, tb, tp]))
    assert env.locked() == 0
    res = kv.wait([ta, tb, tp])
    assert all(r.status is S.CANCELLED for r in res.values())


# --------------------------------------------------------------------------------------------- threads


def test_concurrent_puts_and_gets_of_distinct_and_shared_prefixes(env: KVEnv) -> None:
    """Six threads store and load sequences that share a common prefix (all), a pair prefix (two threads)
    and a suffix of their own, half through get_async/put_async and half through match + launch.
    Every load a thread sees must be byte-exact; afterwards every sequence loads whole."""
    kv, eng = env.kv, env.eng
    n_threads, rounds = 6, 3
    blocks_per_thread = 10  # 5 source, 5 destination (4 whole blocks + the partial one each)
    common_tokens, common_data = env.tokens(2 * T), [eng.random_block() for _ in range(2)]
    pair_tokens = [env.tokens(T) for _ in range(n_threads // 2)]
    pair_data = [eng.random_block() for _ in range(n_threads // 2)]
    own_tokens = [[env.tokens(T + 3) for _ in range(rounds)] for _ in range(n_threads)]
    own_data = [[eng.random_block() for _ in range(rounds)] for _ in range(n_threads)]
    partial_data = [eng.random_block() for _ in range(n_threads)]

    def sequence(t: int, r: int) -> tuple[np.ndarray, list[torch.Tensor]]:
        tokens = np.concatenate([common_tokens, pair_tokens[t // 2], own_tokens[t][r]])
        return tokens, common_data + [pair_data[t // 2], own_data[t][r]]

    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            base = t * blocks_per_thread
            src, dst = list(range(base, base + 5)), list(range(base + 5, base + 10))
            use_async = t % 2 == 0
            barrier.wait()
            for r in range(rounds):
                tokens, data = sequence(t, r)
                for b, d in zip(src, data + [partial_data[t]]):
                    eng.write(b, d)
                if use_async:
                    tid = kv.put_async(tokens, np.concatenate([env.slots(src[:4]), env.partial_slots(src[4], 3)]))
                else:
                    tid, mask = kv.put_match(tokens)
                    assert not mask[4 * T:].any()
                    kv.launch(tid, env.slots([b for i, b in enumerate(src[:4]) if mask[i * T]]))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS, res
                eng.poison(dst)
                if use_async:
                    tid = kv.get_async(tokens, np.concatenate([env.slots(dst[:4]), env.partial_slots(dst[4], 3)]))
                else:
                    tid, mask = kv.get_match(tokens)
                    kv.launch(tid, env.slots(dst[: int(mask.sum()) // T]))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS, res
                hit = int(res.return_mask.sum()) // T
                # Other threads may still be writing shared blocks: a get loads a (possibly empty) prefix.
                assert not res.return_mask[hit * T:].any() and res.return_mask[: hit * T].all()
                eng.assert_blocks(dst[:hit], data[:hit])
                for b in dst[hit:]:
                    assert eng.is_poisoned(b)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    if errors:
        raise errors[0]

    assert_clean(kv)
    dst = [60, 61, 62, 63]
    for t in range(n_threads):
        for r in range(rounds):
            tokens, data = sequence(t, r)
            env.get_and_check(tokens, dst, data)
    stats = kv.cache_stats()["cpu"]
    assert stats["num_cached"] == 2 + n_threads // 2 + n_threads * rounds
    assert stats["evicted"] == 0


def test_concurrent_gets_of_one_sequence(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(3 * T)
    data = env.put(tokens, [0, 1, 2])
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            dst = [8 + 3 * t, 9 + 3 * t, 10 + 3 * t]
            for _ in range(20):
                eng.poison(dst)
                tid = kv.get_async(tokens, env.slots(dst))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS and res.return_mask.all(), res
                eng.assert_blocks(dst, data)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a get did not end within 60 s"
    if errors:
        raise errors[0]
    assert kv.cache_stats()["get_hit_tokens"] == 8 * 20 * 3 * T


# --------------------------------------------------------------------------------------------- eviction


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


# --------------------------------------------------------------------------------------------- reset


def test_reset_drops_every_cached_block(env: KVEnv) -> None:
    kv = env.kv
    a, b = env.tokens(3 * T), env.tokens(2 * T)
    env.put(a, [0, 1, 2])
    env.put(b, [3, 4])
    assert kv.cache_stats()["cpu"]["num_cached"] == 5
    kv.reset()
    stats = kv.cache_stats()["cpu"]
    assert stats["num_cached"] == 0 and stats["num_free"] == NUM_CPU_BLOCKS
    for tokens in (a, b):
        tid, mask = kv.get_match(tokens)
        assert not mask.any()
        wait_one(kv, tid)
    assert_clean(kv)
    # The tier works after a reset.
    data = env.put(a, [5, 6, 7])
    env.get_and_check(a, [8, 9, 10], data)


@pytest.mark.parametrize("kind", ["get", "put"])
def test_reset_refuses_while_a_task_is_unlaunched(env: KVEnv, kind: str) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [0, 1])
    if kind == "get":
        tid, _ = kv.get_match(tokens)
    else:
        tid, _ = kv.put_match(env.tokens(2 * T))
    with pytest.raises(TaskError, match="reset"):
        kv.reset()
    assert kv.cache_stats()["cpu"]["num_cached"] >= 2
    assert wait_one(kv, tid).status is S.UNREADY  # the refused reset left the task alone
    kv.cancel(tid)
    assert wait_one(kv, tid).status is S.CANCELLED
    env.get_and_check(tokens, [4, 5], data)  # the refused reset dropped nothing
    kv.reset()
    tid, mask = kv.get_match(tokens)
    assert not mask.any()
    wait_one(kv, tid)


def test_reset_refuses_while_a_task_is_running(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [0, 1])
    eng.poison([4, 5])
    with gated(kv) as g:
        tid = kv.get_async(tokens, env.slots([4, 5]))
        with pytest.raises(TaskError, match="reset"):
            kv.reset()
        g.gate.set()
        assert wait_one(kv, tid).status is S.SUCCESS
    eng.assert_blocks([4, 5], data)
    kv.reset()
    assert kv.cache_stats()["cpu"]["num_cached"] == 0


# --------------------------------------------------------------------------------------------- shutdown


def test_shutdown_cancels_unlaunched_tasks_and_later_calls_raise(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.put(tokens, [0, 1])
    tg, _ = kv.get_match(tokens)
    tp, _ = kv.put_match(env.tokens(3 * T))
    plane = kv.control_plane
    assert plane.locked_blocks() == (5, 0)
    kv.shutdown()
    assert plane.locked_blocks() == (0, 0)
    plane.check_consistency()
    assert not kv.is_ready()
    res = kv.wait([tg, tp], timeout=1)
    assert res[tg].status is S.CANCELLED and res[tp].status is S.CANCELLED

    calls = {
        "get_match": lambda: kv.get_match(tokens),
        "put_match": lambda: kv.put_match(tokens),
        "get_async": lambda: kv.get_async(tokens, env.slots([2, 3])),
        "put_async": lambda: kv.put_async(tokens, env.slots([2, 3])),
        "prefetch_async": lambda: kv.prefetch_async(tokens),
        "reset": kv.reset,
        "cache_stats": kv.cache_stats,
        "launch": lambda: kv.launch(tg, env.slots([2, 3])),
    }
    for name, call in calls.items():
        with pytest.raises(TaskError):
            call()
            pytest.fail(f"{name} after shutdown did not raise")
    with pytest.raises(TaskError, match="start"):
        kv.get_match(tokens)
    kv.shutdown()  # idempotent


def test_shutdown_finishes_launched_copies(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(4 * T)
    env.eng.fill([0, 1, 2, 3])
    tid = kv.put_async(tokens, env.slots([0, 1, 2, 3]))
    plane = kv.control_plane
    host_ids = env.host_ids(tid)
    assert len(host_ids) == 4
    kv.shutdown()
    res = wait_one(kv, tid, timeout=1)
    assert res.status is S.SUCCESS
    assert plane.locked_blocks() == (0, 0)
    assert all(plane.cpu_block(i)[0] for i in host_ids)  # the copy finished and its blocks were committed
