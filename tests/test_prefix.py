"""Prefix semantics: partial hits, divergence inside a block, namespaces that never share."""

from __future__ import annotations

import numpy as np

from flexkv import KVManager, ModelConfig

from kv_helpers import configs, hit_tokens, load, store

TPB = 16  # the default tokens_per_block


def test_longer_prompt_hits_the_stored_prefix(env) -> None:
    kv, eng = env.kv, env.eng
    prefix = env.tokens(4 * TPB)
    want = env.put(prefix, [0, 1, 2, 3])
    longer = np.concatenate([prefix, env.tokens(3 * TPB + 5)])
    eng.poison()
    mask = load(kv, longer, [10, 11, 12, 13, 14, 15, 16])
    assert mask.sum() == 4 * TPB and mask[: 4 * TPB].all()
    eng.assert_blocks([10, 11, 12, 13], want)
    # Only the stored prefix was written; blocks 14.. are still poisoned.
    eng.assert_poisoned([14, 15, 16])


def test_shorter_prompt_hits_part_of_a_stored_sequence(env) -> None:
    tokens = env.tokens(6 * TPB)
    data = env.put(tokens, range(6))
    assert hit_tokens(env.kv, tokens[: 2 * TPB + 7]) == 2 * TPB
    env.get_and_check(tokens[: 2 * TPB + 7], [20, 21, 22], data[:2])


def test_divergence_inside_a_block_stops_the_hit_at_that_block(env) -> None:
    kv = env.kv
    tokens = env.tokens(5 * TPB)
    data = env.put(tokens, range(5))
    other = tokens.copy()
    other[2 * TPB + 9] += 1  # inside block 2
    assert hit_tokens(kv, other) == 2 * TPB
    # Storing the divergent sequence adds only its own blocks 2..4; both then hit fully.
    other_data = env.eng.fill(range(10, 15))
    put_mask = store(kv, other, range(10, 15))
    assert np.flatnonzero(put_mask).min() == 2 * TPB and put_mask.sum() == 3 * TPB
    env.get_and_check(tokens, list(range(20, 25)), data)
    env.get_and_check(other, list(range(20, 25)), data[:2] + other_data[2:])


def test_same_tokens_after_a_different_prefix_do_not_hit(env) -> None:
    a = env.tokens(4 * TPB)
    env.put(a, range(4))
    b = a.copy()
    b[0] += 1  # blocks 1..3 have equal tokens, but their prefix differs
    task_id, mask = env.kv.get_match(b)
    assert not mask.any()
    assert env.kv.wait(task_id)[task_id].ok


def test_token_mask_skips_blocks_the_engine_holds(env) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * TPB)
    want = env.put(tokens, range(4))
    eng.poison()
    token_mask = np.zeros(len(tokens), dtype=bool)
    token_mask[2 * TPB:] = True  # the engine computed blocks 0 and 1 itself
    mask = load(kv, tokens, [0, 0, 20, 21], token_mask=token_mask)
    assert np.array_equal(mask, token_mask)
    eng.assert_blocks([20, 21], want[2:])
    eng.assert_poisoned([0, 1])


def test_namespaces_never_share(env) -> None:
    kv = env.kv
    tokens = env.tokens(3 * TPB)
    data = env.put(tokens, range(3), namespace="tenant-a")
    for ns in (None, "tenant-b", ["tenant-a", "lora-1"]):
        task_id, mask = kv.get_match(tokens, namespace=ns)
        assert not mask.any(), ns
        assert kv.wait(task_id)[task_id].ok
    env.get_and_check(tokens, [10, 11, 12], data, namespace="tenant-a")


def test_models_with_other_layouts_get_other_keys() -> None:
    """The namespace carries the KV layout fingerprint: a block of one model shape never serves another."""
    keys = []
    for model in (ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="float16"),
                  ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="bfloat16"),
                  ModelConfig(num_layers=2, num_kv_heads=2, head_size=8, dtype="float16", tp_size=2),
                  ModelConfig(num_layers=3, num_kv_heads=2, head_size=8, dtype="float16")):
        kv = KVManager(model, configs(num_cpu_blocks=8)[1])
        keys.append(kv.block_keys(np.arange(TPB, dtype=np.int64)).tobytes())
    assert len(set(keys)) == len(keys)


def test_namespace_parts_cannot_be_forged_by_joining_them(env) -> None:
    kv = env.kv
    tokens = env.tokens(2 * TPB)
    data = env.put(tokens, range(2), namespace=["tenantA", "salt"])
    for forged in (["tenantA\x1fsalt"], ["tenantA|salt"], ["tenantA", "salt", ""], ['tenantA", "salt']):
        task_id, mask = kv.get_match(tokens, namespace=forged)
        assert not mask.any(), forged
        assert kv.wait(task_id)[task_id].ok
    env.get_and_check(tokens, [10, 11], data, namespace=["tenantA", "salt"])
