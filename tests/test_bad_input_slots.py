"""Bad slot mappings to launch and the async calls: a TaskError naming slot_mapping, the task failed (or never
made), its blocks unlocked, and nothing copied or made readable.

Every manager starts with a reference sequence stored (conftest's make_env); every test ends by loading it into
poisoned (NaN) engine blocks and comparing bytes: after bad input the CPU index is consistent, holds no lock, and
the data stored before still loads byte-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE, DEFAULT_ENGINE_BLOCKS, S, slots
from kv_helpers import RefKVEnv as Env

T = DEFAULT_CACHE["tokens_per_block"]
NUM_ENGINE_BLOCKS = DEFAULT_ENGINE_BLOCKS


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def _bad_slots(case: str, good_blocks: Sequence[int]) -> np.ndarray | torch.Tensor:
    good = slots(good_blocks, T)
    if case == "too_short":
        return good[:-1]
    if case == "one_block_short":
        return good[:-T]
    if case == "too_long":
        return np.concatenate([good, slots([40], T)])
    if case == "out_of_range_block":
        return slots(list(good_blocks[:-1]) + [NUM_ENGINE_BLOCKS], T)
    if case == "far_out_of_range":
        return slots(list(good_blocks[:-1]) + [10**9], T)
    if case == "negative_block":
        return slots([good_blocks[0], -1] + list(good_blocks[2:]), T)
    if case == "negative_slot":
        s = good.copy()
        s[0] = -1
        return s
    if case == "not_block_aligned":
        return good + 1
    if case == "not_consecutive":
        s = good.copy()
        s[T + 2], s[T + 5] = s[T + 5], s[T + 2]
        return s
    if case == "float":
        return good.astype(np.float64)
    if case == "float_tensor":
        return torch.from_numpy(good).float()
    if case == "2d":
        return good.reshape(-1, T)
    raise AssertionError(case)


SLOT_CASES = ["too_short", "one_block_short", "too_long", "out_of_range_block", "far_out_of_range",
              "negative_block", "negative_slot", "not_block_aligned", "not_consecutive", "float", "float_tensor",
              "2d"]


@pytest.mark.parametrize("case", SLOT_CASES)
def test_bad_slots_fail_a_get_and_unlock_its_blocks(env: Env, case: str) -> None:
    kv, eng = env.kv, env.eng
    dst = [20, 21, 22]
    eng.poison(dst)
    tid, mask = kv.get_match(env.ref_tokens)
    assert mask.sum() == 3 * T
    assert env.locked() == 3
    with pytest.raises(TaskError) as exc:
        kv.launch(tid, _bad_slots(case, dst))
    assert "slot_mapping" in str(exc.value), str(exc.value)
    assert str(tid) in str(exc.value)
    assert env.locked() == 0
    res = kv.wait(tid, timeout=1)[tid]
    assert res.status is S.FAILED
    assert res.error and "slot_mapping" in res.error
    assert kv.wait(tid, timeout=0)[tid].status is S.NOTFOUND
    assert env.failed() == 1
    for b in dst:
        assert eng.is_poisoned(b)  # nothing was copied
    env.assert_healthy()


@pytest.mark.parametrize("case", SLOT_CASES)
def test_bad_slots_fail_a_put_and_leave_its_blocks_rewritable(env: Env, case: str) -> None:
    kv = env.kv
    tokens = env.tokens(3 * T)
    src = [30, 31, 32]
    env.eng.fill(src)
    tid, mask = kv.put_match(tokens)
    assert mask.all()
    assert env.locked() == 3
    with pytest.raises(TaskError) as exc:
        kv.launch(tid, _bad_slots(case, src))
    assert "slot_mapping" in str(exc.value), str(exc.value)
    assert env.locked() == 0
    res = kv.wait(tid, timeout=1)[tid]
    assert res.status is S.FAILED
    assert res.error and "slot_mapping" in res.error

    # The blocks are not readable, and the next put offers them again.
    tid, mask = kv.get_match(tokens)
    assert not mask.any()
    kv.wait(tid)
    data = env.put(tokens, [33, 34, 35])
    env.get_and_check(tokens, [36, 37, 38], data)
    env.assert_healthy()


@pytest.mark.parametrize("bad", [None, 5], ids=["none", "int"])
def test_launch_with_a_slot_mapping_that_is_not_an_array(env: Env, bad: object) -> None:
    """A TaskError naming the slot mapping, as for every other bad slot mapping (get_async(tokens, None)
    already says 'slot_mapping has shape ()'); not a bare TypeError from list(None)."""
    kv = env.kv
    tid, _ = kv.get_match(env.ref_tokens)
    try:
        with pytest.raises(TaskError) as exc:
            kv.launch(tid, bad)
        assert "slot_mapping" in str(exc.value), str(exc.value)
    finally:
        if kv.wait(tid, timeout=1)[tid].status is S.UNREADY:
            kv.cancel(tid)
    env.assert_healthy()


@pytest.mark.parametrize("call", ["get_async", "put_async"])
@pytest.mark.parametrize("case", ["too_short", "too_long", "2d", "float", "float_tensor"])
def test_async_slot_mapping_of_wrong_shape_or_dtype_is_refused_before_matching(env: Env, call: str, case: str) -> None:
    tokens = env.ref_tokens if call == "get_async" else env.tokens(3 * T)
    bad = _bad_slots(case, [20, 21, 22])
    cached_before = env.cached()
    with pytest.raises(TaskError, match="slot_mapping"):
        getattr(env.kv, call)(tokens[: 3 * T], bad)
    assert env.locked() == 0
    assert env.cached() == cached_before
    assert env.failed() == 0
    env.assert_healthy()


@pytest.mark.parametrize("call", ["get_async", "put_async"])
@pytest.mark.parametrize("case", ["out_of_range_block", "negative_block", "negative_slot", "not_block_aligned",
                                  "not_consecutive"])
def test_async_bad_slot_values_fail_the_task(env: Env, call: str, case: str) -> None:
    kv = env.kv
    tokens = env.ref_tokens[: 3 * T] if call == "get_async" else env.tokens(3 * T)
    if call == "put_async":
        env.eng.fill([20, 21, 22])
    with pytest.raises(TaskError, match="slot_mapping"):
        getattr(kv, call)(tokens, _bad_slots(case, [20, 21, 22]))
    assert env.locked() == 0
    assert env.failed() == 1
    if call == "put_async":  # nothing became readable; the put can be redone
        tid, mask = kv.get_match(tokens)
        assert not mask.any()
        kv.wait(tid)
        data = env.put(tokens, [23, 24, 25])
        env.get_and_check(tokens, [26, 27, 28], data)
    env.assert_healthy()
