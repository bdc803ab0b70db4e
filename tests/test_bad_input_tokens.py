"""Bad token ids and token masks to KVManager's get / put / prefetch calls: a TaskError naming the argument,
and no task, lock or reservation left behind.

Every manager starts with a reference sequence stored (conftest's make_env); every test ends by loading it into
poisoned (NaN) engine blocks and comparing bytes: after bad input the CPU index is consistent, holds no lock, and
the data stored before still loads byte-exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv.core.errors import TaskError

from kv_helpers import DEFAULT_CACHE
from kv_helpers import RefKVEnv as Env

T = DEFAULT_CACHE["tokens_per_block"]


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


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
