"""Shared helpers for tests that move KV bytes through a KVManager."""

from __future__ import annotations

import numpy as np
import torch

from flexkv import KVManager


def slots_for(mask: np.ndarray, engine_blocks: list[int] | np.ndarray, tokens_per_block: int) -> np.ndarray:
    """Engine slots of the masked tokens when sequence block i lives in engine block engine_blocks[i]."""
    positions = np.flatnonzero(mask)
    blocks = np.asarray(engine_blocks, dtype=np.int64)[positions // tokens_per_block]
    return blocks * tokens_per_block + positions % tokens_per_block


def store(kv: KVManager, tokens: np.ndarray, engine_blocks, namespace=None) -> np.ndarray:
    """put_match + launch + wait; returns the put's mask."""
    task_id, mask = kv.put_match(tokens, namespace=namespace)
    kv.launch(task_id, slots_for(mask, engine_blocks, kv.tokens_per_block))
    response = kv.wait(task_id)[task_id]
    assert response.ok, response
    return mask


def load(kv: KVManager, tokens: np.ndarray, engine_blocks, token_mask=None, namespace=None) -> np.ndarray:
    """get_match + launch + wait; returns the get's mask."""
    task_id, mask = kv.get_match(tokens, token_mask, namespace=namespace)
    kv.launch(task_id, slots_for(mask, engine_blocks, kv.tokens_per_block))
    response = kv.wait(task_id)[task_id]
    assert response.ok, response
    return mask


def poison(tensors) -> None:
    for t in tensors:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(-1)


def random_tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 50_000, n, dtype=np.int64)


def assert_no_locks(kv: KVManager) -> None:
    """Every index of the manager's cache (CPU, and SSD when on) is consistent and holds no lock."""
    kv.control_plane.check_consistency()
    assert kv.control_plane.locked_blocks() == (0, 0)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality of bytes (NaN poison compares unequal to anything but itself as bytes)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
