"""KVManager's task API: what wait and try_wait report (NOTFOUND, UNREADY, TIMEOUT, SUCCESS once) and when.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import time

import numpy as np

from kv_helpers import DEFAULT_CACHE, KVEnv, S, gated, wait_one

T = DEFAULT_CACHE["tokens_per_block"]


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
