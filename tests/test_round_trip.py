"""Byte-exact round trips: random KV in registered tensors -> put -> poison -> get -> equal, for every engine
memory layout the fake has (the three KVCacheLayoutTypes and three described by block views)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kv_helpers import ENGINE_KINDS, HOST_ORDER_KINDS, engine_for, load, store

LAYERS, NUM_BLOCKS = 3, 24


@pytest.mark.parametrize("tpb", [16, 32, 64])
@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_round_trip_is_byte_exact(make_kv, kind: str, tpb: int) -> None:
    env = make_kv(engine=kind, engine_blocks=NUM_BLOCKS, num_layers=LAYERS, tokens_per_block=tpb, num_cpu_blocks=64)
    kv, eng, rng = env.kv, env.eng, env.rng
    eng.fill(range(NUM_BLOCKS))
    n_blocks = 5
    tokens = env.tokens(n_blocks * tpb + tpb // 2)  # a trailing partial block is never stored
    src = rng.permutation(NUM_BLOCKS)[:n_blocks]    # scattered, unsorted engine blocks
    mask = store(kv, tokens, src)
    assert mask.sum() == n_blocks * tpb and not mask[n_blocks * tpb:].any()
    original = [eng.read(b) for b in src]

    eng.poison()
    dst = rng.permutation(NUM_BLOCKS)[:n_blocks]
    got = load(kv, tokens, dst)
    assert got.sum() == n_blocks * tpb
    eng.assert_blocks(dst, original)
    # Blocks that were not loaded into stay poisoned.
    eng.assert_poisoned(sorted(set(range(NUM_BLOCKS)) - {int(d) for d in dst}))


@pytest.mark.parametrize("kind", ENGINE_KINDS)
def test_mla_round_trip(make_kv, kind: str) -> None:
    env = make_kv(engine=kind, engine_blocks=NUM_BLOCKS, num_layers=LAYERS, num_kv_heads=1, use_mla=True,
                  num_cpu_blocks=64)
    tokens = env.tokens(3 * env.tpb)
    want = env.eng.fill([3, 9, 1])
    store(env.kv, tokens, [3, 9, 1])
    env.eng.poison()
    load(env.kv, tokens, [0, 2, 4])
    env.eng.assert_blocks([0, 2, 4], want)
    env.eng.assert_poisoned([1, 3, 5])


@pytest.mark.parametrize("src_kind,dst_kind", list(itertools.permutations(HOST_ORDER_KINDS, 2)))
def test_layouts_share_the_host_block_layout(make_kv, gen: torch.Generator, src_kind: str, dst_kind: str) -> None:
    """A block stored from one engine layout loads into an engine of another: the host layout is one, and a
    block's bytes in each of these layouts are [layer][k|v][token][head][dim] (the fake reads them so)."""
    env = make_kv(engine=src_kind, engine_blocks=NUM_BLOCKS, num_layers=LAYERS, num_cpu_blocks=64)
    tokens = env.tokens(2 * env.tpb)
    want = env.eng.fill([7, 2])
    store(env.kv, tokens, [7, 2])
    dst = engine_for(env.kv, dst_kind, num_blocks=NUM_BLOCKS, gen=gen)
    dst.register(env.kv)
    load(env.kv, tokens, [0, 1])
    dst.assert_blocks([0, 1], want)
    dst.assert_poisoned([2])
    # Spelled out for one chunk: layer 1's V of the first block, as the source engine holds it.
    if src_kind == "layerfirst" and dst_kind == "blockfirst":
        assert torch.equal(env.eng.tensors[1][1, 7].view(torch.uint8), dst.tensors[0][0, 1, 1].view(torch.uint8))


def test_many_blocks_in_one_task_use_every_copy_thread(make_kv) -> None:
    env = make_kv(engine_blocks=600, num_layers=LAYERS, num_cpu_blocks=600)
    kv, eng, rng = env.kv, env.eng, env.rng
    tokens = env.tokens(512 * env.tpb)
    src = rng.permutation(600)[:512]
    want = eng.fill(src)
    store(kv, tokens, src)
    eng.poison()
    dst = rng.permutation(600)[:512]
    load(kv, tokens, dst)
    eng.assert_blocks(dst, want)
    eng.assert_poisoned(np.setdiff1d(np.arange(600), dst))
