"""Bad input to KVManager: each gets a clear exception (its type, and a message naming the argument), and
afterwards the CPU index is consistent, holds no lock, and the data stored before still loads byte-exact.

Every manager starts with a reference sequence stored; every test ends by loading it into poisoned (NaN)
engine blocks and comparing bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flexkv import EngineLayout, KVCacheLayout, KVCacheLayoutType, KVManager, KVResponseStatus
from flexkv.core.errors import ConfigError, FlexKVError, LayoutError, TaskError

from kv_helpers import DEFAULT_CACHE, DEFAULT_ENGINE_BLOCKS, DEFAULT_MODEL, KVEnv, configs, slots

L, H, D = DEFAULT_MODEL["num_layers"], DEFAULT_MODEL["num_kv_heads"], DEFAULT_MODEL["head_size"]
T = DEFAULT_CACHE["tokens_per_block"]
NUM_ENGINE_BLOCKS = DEFAULT_ENGINE_BLOCKS
DTYPE = torch.float16
LAYERFIRST = KVCacheLayoutType.LAYERFIRST

S = KVResponseStatus

REF_SRC = [0, 1, 2]        # engine blocks the reference sequence was stored from
REF_DST = [60, 61, 62]     # engine blocks it is loaded into by the health check


def layerfirst_caches(num_layers: int = L, num_blocks: int = NUM_ENGINE_BLOCKS, tpb: int = T, heads: int = H,
                      head_size: int = D, dtype: torch.dtype = DTYPE) -> list[torch.Tensor]:
    """LAYERFIRST tensors of any shape, for registrations that must be refused."""
    return [torch.full((2, num_blocks, tpb, heads, head_size), float("nan"), dtype=dtype) for _ in range(num_layers)]


@dataclass
class Env(KVEnv):
    """KVEnv with a reference sequence stored at start, which the health check loads byte-exact."""

    ref_tokens: np.ndarray | None = None
    ref_data: list[torch.Tensor] | None = None

    def failed(self) -> int:
        return int(self.kv.cache_stats()["tasks_failed"])

    def assert_healthy(self) -> None:
        """No lock left, index consistent, and the reference sequence still loads byte-exact."""
        assert self.locked() == 0, self.kv.cache_stats()["cpu"]
        self.kv.control_plane.check_consistency()
        if self.ref_tokens is not None:
            self.get_and_check(self.ref_tokens, REF_DST, self.ref_data)
            assert self.locked() == 0
            self.kv.control_plane.check_consistency()


@pytest.fixture
def make_env(make_kv) -> Iterator[Callable[..., Env]]:
    """make_kv plus the reference sequence; at teardown each manager still running must be healthy."""
    created: list[Env] = []

    def factory(register: bool = True) -> Env:
        base = make_kv(register=register)
        env = Env(base.kv, base.eng, base.rng)
        created.append(env)
        if register:
            env.ref_tokens = env.tokens(3 * T + 5)
            env.ref_data = env.put(env.ref_tokens[: 3 * T], REF_SRC)
        return env

    yield factory
    for env in created:
        if env.kv.is_ready():
            env.assert_healthy()


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


# --------------------------------------------------------------------------------------------- token inputs


def _bad_tokens(env: Env, case: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(token_ids, token_mask, the argument the error must name)."""
    tokens = env.tokens(3 * T)
    n = len(tokens)
    if case == "float_token_ids":
        return tokens.astype(np.float64), None, "token_ids"
    if case == "float_tensor_token_ids":
        return torch.from_numpy(tokens).float(), None, "token_ids"
    if case == "2d_token_ids":
        return tokens.reshape(3, T), None, "token_ids"
    if case == "mask_too_short":
        return tokens, np.ones(n - 1, dtype=bool), "token_mask"
    if case == "mask_too_long":
        return tokens, np.ones(n + T, dtype=bool), "token_mask"
    if case == "int_mask":
        mask = np.ones(n, dtype=np.int64)
        mask[:T] = 0
        return tokens, mask, "token_mask"
    if case == "float_mask":
        return tokens, np.ones(n, dtype=np.float32), "token_mask"
    if case == "mask_true_then_false":
        mask = np.zeros(n, dtype=bool)
        mask[:T] = True
        return tokens, mask, "token_mask"
    if case == "mask_with_hole":
        mask = np.ones(n, dtype=bool)
        mask[:4] = False
        mask[T + 3] = False
        return tokens, mask, "token_mask"
    raise AssertionError(case)


TOKEN_CASES = ["float_token_ids", "float_tensor_token_ids", "2d_token_ids", "mask_too_short", "mask_too_long",
               "int_mask", "float_mask", "mask_true_then_false", "mask_with_hole"]


@pytest.mark.parametrize("call", ["get_match", "put_match", "get_async", "put_async"])
@pytest.mark.parametrize("case", TOKEN_CASES)
def test_bad_tokens_or_mask_are_refused(env: Env, call: str, case: str) -> None:
    kv = env.kv
    tokens, mask, arg = _bad_tokens(env, case)
    cached_before, failed_before = env.cached(), env.failed()
    n_slots = int(np.asarray(tokens).size) if mask is None else int(np.count_nonzero(mask))
    n_slots = min(n_slots, 3 * T)
    slot_mapping = np.arange(n_slots, dtype=np.int64) + 10 * T
    with pytest.raises(TaskError) as exc:
        if call == "get_match":
            kv.get_match(tokens, token_mask=mask)
        elif call == "put_match":
            kv.put_match(tokens, token_mask=mask)
        elif call == "get_async":
            kv.get_async(tokens, slot_mapping, token_mask=mask)
        else:
            kv.put_async(tokens, slot_mapping, token_mask=mask)
    assert arg in str(exc.value), str(exc.value)
    assert env.locked() == 0
    assert env.cached() == cached_before  # a refused put reserved nothing
    assert env.failed() == failed_before  # no task was made
    env.assert_healthy()


def test_bad_tokens_on_prefetch(env: Env) -> None:
    with pytest.raises(TaskError, match="token_ids"):
        env.kv.prefetch_async(env.tokens(2 * T).astype(np.float32))
    env.assert_healthy()


# --------------------------------------------------------------------------------------------- slot mappings


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


# --------------------------------------------------------------------------------------------- launch misuse


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


# --------------------------------------------------------------------------------------------- register_kv_caches


def _bad_registration(case: str) -> tuple[object, object, str]:
    """(kv_caches, kv_layout, a word the message must contain)."""
    good_layout = KVCacheLayout(LAYERFIRST, L, NUM_ENGINE_BLOCKS, T, H, D)
    if case == "float32_tensors":
        return layerfirst_caches(dtype=torch.float32), good_layout, "dtype"
    if case == "wrong_head_size":
        return layerfirst_caches(head_size=D // 2), good_layout, "shape"
    if case == "wrong_num_blocks":
        return layerfirst_caches(num_blocks=32), good_layout, "shape"
    if case == "too_many_layer_tensors":
        return layerfirst_caches(num_layers=L + 1), good_layout, "layers"
    if case == "too_few_layer_tensors":
        return layerfirst_caches(num_layers=1), good_layout, "layers"
    if case == "layout_with_wrong_num_layer":
        return (layerfirst_caches(num_layers=L + 1),
                KVCacheLayout(LAYERFIRST, L + 1, NUM_ENGINE_BLOCKS, T, H, D), "layers")
    if case == "non_contiguous":
        caches = [torch.zeros(2, NUM_ENGINE_BLOCKS, T, D, H, dtype=DTYPE).transpose(3, 4) for _ in range(L)]
        assert not caches[0].is_contiguous()
        return caches, good_layout, "contiguous"
    if case == "tokens_per_block_mismatch":
        return (layerfirst_caches(tpb=T // 2, num_blocks=2 * NUM_ENGINE_BLOCKS),
                KVCacheLayout(LAYERFIRST, L, 2 * NUM_ENGINE_BLOCKS, T // 2, H, D), "tokens_per_block")
    if case == "layout_is_a_dict":
        return layerfirst_caches(), {"type": "LAYERFIRST", "num_layer": L}, "kv_layout"
    if case == "layout_is_a_string":
        return layerfirst_caches(), "LAYERFIRST", "kv_layout"
    if case == "layout_is_none":
        return layerfirst_caches(), None, "kv_layout"
    if case == "layout_is_a_type":
        return layerfirst_caches(), LAYERFIRST, "kv_layout"
    if case == "blockfirst_as_a_list":
        return layerfirst_caches(), KVCacheLayout(KVCacheLayoutType.BLOCKFIRST, L, NUM_ENGINE_BLOCKS, T, H, D), \
            "BLOCKFIRST"
    if case == "not_tensors":
        return [[0.0] * 4 for _ in range(L)], good_layout, "kv_caches"
    raise AssertionError(case)


REGISTER_CASES = ["float32_tensors", "wrong_head_size", "wrong_num_blocks", "too_many_layer_tensors",
                  "too_few_layer_tensors", "layout_with_wrong_num_layer", "non_contiguous",
                  "tokens_per_block_mismatch", "layout_is_a_dict", "layout_is_a_string", "layout_is_none",
                  "layout_is_a_type", "blockfirst_as_a_list", "not_tensors"]


@pytest.mark.parametrize("case", REGISTER_CASES)
def test_bad_register_kv_caches_keeps_the_previous_registration(env: Env, case: str) -> None:
    kv = env.kv
    caches, layout, word = _bad_registration(case)
    with pytest.raises(LayoutError) as exc:
        kv.register_kv_caches(caches, layout)
    assert word in str(exc.value), str(exc.value)
    assert kv.is_ready()
    # The engine memory registered before is still the one in use: data loads into it and stores from it.
    env.assert_healthy()
    tokens = env.tokens(2 * T)
    data = env.put(tokens, [40, 41])
    env.get_and_check(tokens, [42, 43], data)


@pytest.mark.parametrize("case", ["float32_tensors", "wrong_head_size", "non_contiguous", "layout_is_none"])
def test_bad_register_kv_caches_on_a_fresh_manager_leaves_it_unregistered(make_env, case: str) -> None:
    env = make_env(register=False)
    kv = env.kv
    caches, layout, word = _bad_registration(case)
    with pytest.raises(LayoutError, match=word):
        kv.register_kv_caches(caches, layout)
    assert not kv.is_ready()
    tid, _ = kv.put_match(env.tokens(T))
    with pytest.raises(TaskError, match="register_kv_caches"):
        kv.launch(tid, env.slots([0]))
    assert kv.wait(tid)[tid].status is S.FAILED
    assert env.locked() == 0
    env.kv.control_plane.check_consistency()


# --------------------------------------------------------------------------------------------- config


def test_enable_ssd_without_a_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        KVManager(*configs(enable_ssd=True))
    assert "ssd_cache_dir" in str(exc.value)


def test_enable_remote_is_refused_naming_the_key() -> None:
    with pytest.raises(FlexKVError) as exc:
        KVManager(*configs(enable_remote=True, num_remote_blocks=1000))
    assert "enable_remote" in str(exc.value)


def test_enable_remote_without_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        KVManager(*configs(enable_remote=True))
    assert exc.value.key == "cache_config.num_remote_blocks"
    assert "num_remote_blocks" in str(exc.value)


def test_wrong_config_types_are_refused() -> None:
    with pytest.raises(TypeError, match="model_config"):
        KVManager({"num_layers": L}, configs()[1])
    with pytest.raises(TypeError, match="cache_config"):
        KVManager(configs()[0], {"tokens_per_block": T})


def test_refused_configs_do_not_disturb_a_running_manager(env: Env) -> None:
    for kwargs in ({"enable_ssd": True, "ssd_cache_dir": "/dev/null/no-such-dir"},
                   {"enable_remote": True, "num_remote_blocks": 10}):
        with pytest.raises(FlexKVError):
            KVManager(*configs(**kwargs)).start()
    env.assert_healthy()


# --------------------------------------------------------------------------------------------- review regressions


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


@pytest.mark.parametrize("case", ["gap", "overlap", "short", "zero_stride"])
def test_engine_layouts_that_do_not_tile_a_block_are_refused(env: Env, case: str) -> None:
    kv = env.kv
    good = kv.engine_layout
    seg = good.segments.copy()
    if case == "gap":
        seg = seg[1:]  # the first chunk of every block would never be written
    elif case == "overlap":
        seg[1, 2] = seg[0, 2]
    elif case == "short":
        seg[-1, 3] -= 2
    else:
        seg[:, 1] = 0
    bad = EngineLayout(seg, good.num_blocks, good.block_bytes, keepalive=good.keepalive)
    with pytest.raises(LayoutError, match="EngineLayout"):
        kv.register_kv_caches(bad)
    assert kv.engine_layout is good
    env.assert_healthy()


def test_manager_arguments_are_checked_before_anything_is_allocated() -> None:
    with pytest.raises(TaskError, match="num_copy_threads"):
        KVManager(*configs(num_cpu_blocks=8), num_copy_threads=0)
    with pytest.raises(ConfigError, match="num_cpu_blocks"):
        KVManager(*configs(num_cpu_blocks=2**31))


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
