"""Misuse of the task calls: launching twice, unknown ids, short or bad batches, before register_kv_caches or
after shutdown, bad layer waits; each refused with a TaskError, the other tasks unharmed.

Every manager starts with a reference sequence stored (conftest's make_env); every test ends by loading it into
poisoned (NaN) engine blocks and comparing bytes: after bad input the CPU index is consistent, holds no lock, and
the data stored before still loads byte-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, DEFAULT_MODEL, S
from kv_helpers import RefKVEnv as Env

L = DEFAULT_MODEL["num_layers"]
T = DEFAULT_CACHE["tokens_per_block"]


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def test_double_launch_is_refused_and_the_first_completes(env: Env) -> None:
    kv, eng = env.kv, env.eng
    dst = [20, 21, 22]
    eng.poison(dst + [23, 24, 25])
    tid, _ = kv.get_match(env.ref_tokens)
    assert kv.launch(tid, env.slots(dst)) == [tid]
    with pytest.raises(TaskError) as exc:
        kv.launch(tid, env.slots([23, 24, 25]))
    assert f"task {tid}" in str(exc.value), str(exc.value)
    res = kv.wait(tid)[tid]
    assert res.status is S.SUCCESS
    eng.assert_blocks(dst, env.ref_data)
    for b in (23, 24, 25):
        assert eng.is_poisoned(b)
    with pytest.raises(TaskError, match=f"unknown task id {tid}"):
        kv.launch(tid, env.slots(dst))  # reported and forgotten
    assert env.failed() == 0
    env.assert_healthy()


def test_same_task_twice_in_one_launch(env: Env) -> None:
    kv, eng = env.kv, env.eng
    dst = [20, 21, 22]
    eng.poison(dst)
    tid, _ = kv.get_match(env.ref_tokens)
    with pytest.raises(TaskError, match=f"task {tid}"):
        kv.launch([tid, tid], [env.slots(dst), env.slots([23, 24, 25])])
    # Nothing was launched: the task is still the caller's to launch once.
    assert kv.wait(tid, timeout=0)[tid].status is S.UNREADY
    kv.launch(tid, env.slots(dst))
    assert kv.wait(tid)[tid].status is S.SUCCESS
    eng.assert_blocks(dst, env.ref_data)
    env.assert_healthy()


def test_launch_of_an_unknown_id(env: Env) -> None:
    with pytest.raises(TaskError, match="unknown task id 777777"):
        env.kv.launch(777777, env.slots([20, 21, 22]))
    with pytest.raises(TaskError, match="unknown task id -3"):
        env.kv.launch([-3], [env.slots([20])])
    env.assert_healthy()


def test_launch_with_fewer_slot_mappings_than_tasks(env: Env) -> None:
    kv, eng = env.kv, env.eng
    t1, _ = kv.get_match(env.ref_tokens)
    t2, _ = kv.get_match(env.ref_tokens)
    with pytest.raises(TaskError, match="slot mappings"):
        kv.launch([t1, t2], [env.slots([20, 21, 22])])
    # Nothing was claimed: both tasks can still be launched.
    res = kv.wait([t1, t2], timeout=0)
    assert res[t1].status is S.UNREADY and res[t2].status is S.UNREADY
    eng.poison([20, 21, 22, 23, 24, 25])
    kv.launch([t1, t2], [env.slots([20, 21, 22]), env.slots([23, 24, 25])])
    res = kv.wait([t1, t2])
    assert res[t1].status is S.SUCCESS and res[t2].status is S.SUCCESS
    eng.assert_blocks([20, 21, 22], env.ref_data)
    eng.assert_blocks([23, 24, 25], env.ref_data)
    env.assert_healthy()


def test_a_bad_task_in_a_batch_launch(env: Env) -> None:
    kv, eng = env.kv, env.eng
    t1, _ = kv.get_match(env.ref_tokens)
    t2, _ = kv.get_match(env.ref_tokens)
    t3, _ = kv.get_match(env.ref_tokens)
    eng.poison([20, 21, 22, 26, 27, 28])
    with pytest.raises(TaskError, match=f"task {t2}.*slot_mapping"):
        kv.launch([t1, t2, t3], [env.slots([20, 21, 22]), env.slots([23, 24]), env.slots([26, 27, 28])])
    # All or nothing: no copy started, every task of the call failed and holds no blocks.
    res = kv.wait([t1, t2, t3])
    assert all(res[t].status is S.FAILED and not res[t].return_mask.any() for t in (t1, t2, t3))
    assert all(eng.is_poisoned(b) for b in [20, 21, 22, 26, 27, 28])
    env.assert_healthy()


def test_launch_before_register_kv_caches(make_env) -> None:
    env = make_env(register=False)
    kv = env.kv
    assert not kv.is_ready()
    tokens = env.tokens(2 * T)
    tid, mask = kv.put_match(tokens)
    assert mask.all()
    with pytest.raises(TaskError, match="register_kv_caches"):
        kv.launch(tid, env.slots([0, 1]))
    res = kv.wait(tid)[tid]
    assert res.status is S.FAILED and "register_kv_caches" in res.error
    assert env.locked() == 0
    env.kv.control_plane.check_consistency()

    with pytest.raises(TaskError, match="register_kv_caches"):
        kv.put_async(tokens, env.slots([0, 1]))
    assert env.locked() == 0

    # Once registered, the same blocks are offered again and round-trip byte-exact.
    kv.register_kv_caches(env.eng.kv_caches, env.eng.kv_layout)
    assert kv.is_ready()
    data = env.put(tokens, [0, 1])
    env.get_and_check(tokens, [2, 3], data)
    env.assert_healthy()


def test_wait_and_try_wait_on_unknown_ids_report_notfound(env: Env) -> None:
    kv = env.kv
    res = kv.wait([123456, -1, 0], timeout=0.1)
    assert {k: v.status for k, v in res.items()} == {123456: S.NOTFOUND, -1: S.NOTFOUND, 0: S.NOTFOUND}
    assert kv.try_wait(123456)[123456].status is S.NOTFOUND
    kv.cancel(123456)  # no exception either
    env.assert_healthy()


def test_failed_and_cancelled_gets_report_no_tokens(env: Env) -> None:
    kv, eng = env.kv, env.eng
    eng.poison([20, 21, 22])
    cancelled, _ = kv.get_match(env.ref_tokens)
    kv.cancel(cancelled)
    failed, _ = kv.get_match(env.ref_tokens)
    with pytest.raises(TaskError):
        kv.launch(failed, env.slots([20, 21, 10_000]))
    res = kv.wait([cancelled, failed])
    assert res[cancelled].status is S.CANCELLED and not res[cancelled].return_mask.any()
    assert res[failed].status is S.FAILED and not res[failed].return_mask.any()
    assert all(eng.is_poisoned(b) for b in [20, 21, 22])
    env.assert_healthy()


def test_a_get_into_the_same_engine_block_twice_is_refused(env: Env) -> None:
    kv = env.kv
    tid, _ = kv.get_match(env.ref_tokens)
    with pytest.raises(TaskError, match="same engine block"):
        kv.launch(tid, env.slots([20, 21, 20]))
    assert kv.wait(tid)[tid].status is S.FAILED
    env.assert_healthy()


def test_a_task_with_nothing_to_copy_is_launched_once(env: Env) -> None:
    kv = env.kv
    tid, mask = kv.get_match(env.tokens(3 * T))  # nothing cached for these
    assert not mask.any()
    with pytest.raises(TaskError, match="slot_mapping has 3 slots"):
        kv.launch(tid, np.arange(3))
    tid, _ = kv.get_match(env.tokens(3 * T))
    assert kv.launch(tid, np.zeros(0, dtype=np.int64)) == [tid]
    with pytest.raises(TaskError, match="launched before"):
        kv.launch(tid, np.zeros(0, dtype=np.int64))
    assert kv.wait(tid)[tid].ok
    env.assert_healthy()


def test_bad_layer_waits_are_refused(env: Env) -> None:
    tid, _ = env.kv.get_match(env.ref_tokens)
    with pytest.raises(TaskError, match="is not launched"):
        env.kv.wait_layer(tid, 0)
    for layer in (-1, L, "0", True):
        with pytest.raises(TaskError, match="layer must be an int"):
            env.kv.wait_layer(tid, layer)
    with pytest.raises(TaskError, match="stream must be"):
        env.kv.wait_layer(tid, 0, stream="s0")
    # as_batch (SGLang passes it) launches the call's tasks together, as every launch does.
    assert env.kv.launch(tid, env.slots([20, 21, 22]), as_batch=True, counter_id=3) == [tid]
    assert env.kv.wait(tid)[tid].ok
    env.assert_healthy()


def test_calls_after_shutdown_are_refused(make_env) -> None:
    env = make_env()
    kv = env.kv
    tid, _ = kv.get_match(env.ref_tokens)
    kv.shutdown()
    assert kv.wait(tid)[tid].status is S.CANCELLED
    for call in (lambda: kv.get_match(env.ref_tokens), lambda: kv.launch(tid, env.slots([1, 2, 3]))):
        with pytest.raises(TaskError, match="not started"):
            call()
    kv.shutdown()  # idempotent
