"""Prefix semantics: partial hits, divergence inside a block, namespaces that never share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, KVCacheLayout, KVCacheLayoutType, KVManager, ModelConfig

from kv_helpers import assert_no_locks, bitwise_equal, load, poison, random_tokens, store

TPB, BLOCKS = 16, 32


@pytest.fixture
def kv_and_caches():
    model = ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype=torch.float16)
    kv = KVManager(model, CacheConfig(num_cpu_blocks=128, tokens_per_block=TPB))
    kv.start()
    caches = [torch.randn(2, BLOCKS, TPB, 2, 8, dtype=torch.float16) for _ in range(2)]
    kv.register_kv_caches(caches, KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, BLOCKS, TPB, 2, 8))
    yield kv, caches
    assert_no_locks(kv)
    kv.shutdown()


def test_longer_prompt_hits_the_stored_prefix(kv_and_caches) -> None:
    kv, caches = kv_and_caches
    rng = np.random.default_rng(1)
    prefix = random_tokens(rng, 4 * TPB)
    store(kv, prefix, [0, 1, 2, 3])
    want = [c[:, 0:4].clone() for c in caches]
    longer = np.concatenate([prefix, random_tokens(rng, 3 * TPB + 5)])
    poison(caches)
    mask = load(kv, longer, [10, 11, 12, 13, 14, 15, 16])
    assert mask.sum() == 4 * TPB and mask[: 4 * TPB].all()
    for w, c in zip(want, caches):
        assert bitwise_equal(w, c[:, 10:14])
    # Only the stored prefix was written; block 14 is still poisoned.
    assert torch.isnan(caches[0][:, 14]).all()


def test_shorter_prompt_hits_part_of_a_stored_sequence(kv_and_caches) -> None:
    kv, caches = kv_and_caches
    rng = np.random.default_rng(2)
    tokens = random_tokens(rng, 6 * TPB)
    store(kv, tokens, range(6))
    task_id, mask = kv.get_match(tokens[: 2 * TPB + 7])
    assert mask.sum() == 2 * TPB
    kv.cancel(task_id)


def test_divergence_inside_a_block_stops_the_hit_at_that_block(kv_and_caches) -> None:
    kv, caches = kv_and_caches
    rng = np.random.default_rng(3)
    tokens = random_tokens(rng, 5 * TPB)
    store(kv, tokens, range(5))
    other = tokens.copy()
    other[2 * TPB + 9] += 1  # inside block 2
    task_id, mask = kv.get_match(other)
    assert mask.sum() == 2 * TPB
    kv.cancel(task_id)
    # Storing the divergent sequence adds only its own blocks 2..4; both then hit fully.
    put_mask = store(kv, other, range(10, 15))
    assert np.flatnonzero(put_mask).min() == 2 * TPB and put_mask.sum() == 3 * TPB
    for seq in (tokens, other):
        tid, m = kv.get_match(seq)
        assert m.sum() == 5 * TPB
        kv.cancel(tid)


def test_same_tokens_after_a_different_prefix_do_not_hit(kv_and_caches) -> None:
    kv, _ = kv_and_caches
    rng = np.random.default_rng(4)
    a = random_tokens(rng, 4 * TPB)
    store(kv, a, range(4))
    b = a.copy()
    b[0] += 1  # blocks 1..3 have equal tokens, but their prefix differs
    task_id, mask = kv.get_match(b)
    assert not mask.any()
    kv.wait(task_id)


def test_token_mask_skips_blocks_the_engine_holds(kv_and_caches) -> None:
    kv, caches = kv_and_caches
    rng = np.random.default_rng(5)
    tokens = random_tokens(rng, 4 * TPB)
    store(kv, tokens, range(4))
    want = [c[:, 2:4].clone() for c in caches]
    poison(caches)
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[2 * TPB:] = True  # the engine computed blocks 0 and 1 itself
    mask = load(kv, tokens, [0, 0, 20, 21], token_mask=token_mask)
    assert np.array_equal(mask, token_mask)
    for w, c in zip(want, caches):
        assert bitwise_equal(w, c[:, 20:22])
    assert torch.isnan(caches[0][:, 0]).all()


def test_namespaces_never_share(kv_and_caches) -> None:
    kv, _ = kv_and_caches
    rng = np.random.default_rng(6)
    tokens = random_tokens(rng, 3 * TPB)
    store(kv, tokens, range(3), namespace="tenant-a")
    for ns in (None, "tenant-b", ["tenant-a", "lora-1"]):
        task_id, mask = kv.get_match(tokens, namespace=ns)
        assert not mask.any(), ns
        kv.wait(task_id)
    task_id, mask = kv.get_match(tokens, namespace="tenant-a")
    assert mask.sum() == 3 * TPB
    kv.cancel(task_id)


def test_models_with_other_layouts_get_other_keys() -> None:
    """The namespace carries the KV layout fingerprint: a block of one model shape never serves another."""
    keys = []
    for model in (ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="float16"),
                  ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="bfloat16"),
                  ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="float16", tp_size=2),
                  ModelConfig(num_layers=3, num_kv_heads=2, head_size=8, dtype="float16")):
        kv = KVManager(model, CacheConfig(num_cpu_blocks=8, tokens_per_block=TPB))
        keys.append(kv.block_keys(np.arange(TPB, dtype=np.int64)).tobytes())
    assert len(set(keys)) == len(keys)


def test_namespace_parts_cannot_be_forged_by_joining_them(kv_and_caches) -> None:
    kv, _ = kv_and_caches
    rng = np.random.default_rng(7)
    tokens = random_tokens(rng, 2 * TPB)
    store(kv, tokens, range(2), namespace=["tenantA", "salt"])
    for forged in (["tenantA\x1fsalt"], ["tenantA|salt"], ["tenantA", "salt", ""], ['tenantA", "salt']):
        task_id, mask = kv.get_match(tokens, namespace=forged)
        assert not mask.any(), forged
        kv.wait(task_id)
