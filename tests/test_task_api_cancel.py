"""KVManager's task API: cancel of unlaunched gets and puts (their blocks unlocked), of several tasks, and of
unknown or finished ones.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, KVEnv, S, wait_one

T = DEFAULT_CACHE["tokens_per_block"]


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
