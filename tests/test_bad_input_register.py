"""Bad engine memory to register_kv_caches (tensors, KVCacheLayouts, EngineLayouts that do not tile a block):
a LayoutError naming what is wrong, and the registration before it (or none) still in use.

Every manager starts with a reference sequence stored (conftest's make_env); every test ends by loading it into
poisoned (NaN) engine blocks and comparing bytes: after bad input the CPU index is consistent, holds no lock, and
the data stored before still loads byte-exact.
"""

from __future__ import annotations

import pytest
import torch

from flexkv import EngineLayout, KVCacheLayout, KVCacheLayoutType
from flexkv.core.errors import LayoutError, TaskError

from kv_helpers import DEFAULT_CACHE, DEFAULT_ENGINE_BLOCKS, DEFAULT_MODEL, S
from kv_helpers import RefKVEnv as Env

L, H, D = DEFAULT_MODEL["num_layers"], DEFAULT_MODEL["num_kv_heads"], DEFAULT_MODEL["head_size"]
T = DEFAULT_CACHE["tokens_per_block"]
NUM_ENGINE_BLOCKS = DEFAULT_ENGINE_BLOCKS
DTYPE = torch.float16
LAYERFIRST = KVCacheLayoutType.LAYERFIRST


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def layerfirst_caches(num_layers: int = L, num_blocks: int = NUM_ENGINE_BLOCKS, tpb: int = T, heads: int = H,
                      head_size: int = D, dtype: torch.dtype = DTYPE) -> list[torch.Tensor]:
    """LAYERFIRST tensors of any shape, for registrations that must be refused."""
    return [torch.full((2, num_blocks, tpb, heads, head_size), float("nan"), dtype=dtype) for _ in range(num_layers)]


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
