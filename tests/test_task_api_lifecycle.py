"""KVManager's reset and shutdown with tasks in every state: reset drops the cache and ends pending tasks
CANCELLED (the original FlexKV's semantics), letting copies in flight finish first; shutdown cancels unlaunched
tasks, finishes launched copies, refuses later calls.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import threading

import pytest

from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, KVEnv, S, assert_clean, gated, wait_one

T = DEFAULT_CACHE["tokens_per_block"]
NUM_CPU_BLOCKS = DEFAULT_CACHE["num_cpu_blocks"]


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
def test_reset_cancels_an_unlaunched_task(env: KVEnv, kind: str) -> None:
    # The original FlexKV's reset: pending tasks end CANCELLED, the cache is dropped anyway.
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.put(tokens, [0, 1])
    if kind == "get":
        tid, _ = kv.get_match(tokens)
    else:
        tid, _ = kv.put_match(env.tokens(2 * T))
    kv.reset()
    assert kv.cache_stats()["cpu"]["num_cached"] == 0
    res = wait_one(kv, tid)
    assert res.status is S.CANCELLED and "reset" in (res.error or "")
    assert wait_one(kv, tid).status is S.NOTFOUND  # reported once
    with pytest.raises(TaskError):
        kv.launch(tid, env.slots([4, 5]))  # a cancelled task cannot be launched
    tid, mask = kv.get_match(tokens)
    assert not mask.any()
    wait_one(kv, tid)
    data = env.put(tokens, [2, 3])  # the tier works after the reset
    env.get_and_check(tokens, [4, 5], data)


def test_reset_lets_a_running_copy_finish_then_cancels_it(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [0, 1])
    eng.poison([4, 5])
    with gated(kv) as g:
        tid = kv.get_async(tokens, env.slots([4, 5]))
        done = threading.Event()
        resetter = threading.Thread(target=lambda: (kv.reset(), done.set()))
        resetter.start()
        assert not done.wait(0.3)  # the copy is in flight: reset waits for it
        g.gate.set()
        resetter.join(20)
        assert done.is_set()
    eng.assert_blocks([4, 5], data)  # the copy finished before its blocks were given out again
    assert wait_one(kv, tid).status is S.CANCELLED
    assert kv.cache_stats()["cpu"]["num_cached"] == 0


def test_reset_gives_up_when_a_copy_outlasts_its_timeout(env: KVEnv) -> None:
    kv = env.kv
    tokens = env.tokens(2 * T)
    env.put(tokens, [0, 1])
    with gated(kv) as g:
        tid = kv.get_async(tokens, env.slots([4, 5]))
        with pytest.raises(TaskError, match="still run"):
            kv.reset(timeout=0.2)
        assert kv.cache_stats()["cpu"]["num_cached"] == 2  # nothing was reset
        g.gate.set()
    assert wait_one(kv, tid).status is S.SUCCESS
    kv.reset()
    assert kv.cache_stats()["cpu"]["num_cached"] == 0


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
