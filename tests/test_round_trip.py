"""Byte-exact round trips: random KV in registered tensors -> put -> poison -> get -> equal."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, EngineLayout, KVCacheLayout, KVCacheLayoutType, KVManager, ModelConfig

from kv_helpers import assert_no_locks, bitwise_equal, load, poison, random_tokens, slots_for, store

LAYERS, HEADS, HEAD, NUM_BLOCKS = 3, 2, 8, 24


def make_caches(kind: str, tpb: int, gen: torch.Generator, mla: bool = False):
    """Returns (kv_caches, kv_layout or None, block(tensors, b) -> list of per-block tensors)."""
    kvd = 1 if mla else 2
    heads = 1 if mla else HEADS

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float16)

    if kind == "layer_first":  # vLLM: per layer [2, num_blocks, block_size, heads, head_size]
        caches = [randn(kvd, NUM_BLOCKS, tpb, heads, HEAD) for _ in range(LAYERS)]
        lay = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, NUM_BLOCKS, tpb, heads, HEAD, is_mla=mla)
        return caches, lay, lambda cs, b: [c[:, b] for c in cs]
    if kind == "layer_block":  # one tensor per layer, K and V inside a block
        caches = [randn(NUM_BLOCKS, kvd, tpb, heads, HEAD) for _ in range(LAYERS)]
        lay = KVCacheLayout(KVCacheLayoutType.LAYERBLOCK, LAYERS, NUM_BLOCKS, tpb, heads, HEAD, is_mla=mla)
        return caches, lay, lambda cs, b: [c[b] for c in cs]
    if kind == "block_first":  # a single pool, every layer of a block together
        pool = randn(NUM_BLOCKS, LAYERS, kvd, tpb, heads, HEAD)
        lay = KVCacheLayout(KVCacheLayoutType.BLOCKFIRST, LAYERS, NUM_BLOCKS, tpb, heads, HEAD, is_mla=mla)
        return [pool], lay, lambda cs, b: [cs[0][b]]
    if kind == "vllm_cpu":  # vLLM CPU backend: per layer [num_blocks, heads, block_size, 2*head_size]
        caches = [randn(NUM_BLOCKS, heads, tpb, kvd * HEAD) for _ in range(LAYERS)]
        return caches, None, lambda cs, b: [c[b] for c in cs]
    if kind == "trtllm_pool":  # TensorRT-LLM: [num_blocks, layers, 2, tpb*heads*head_size]
        pool = randn(NUM_BLOCKS, LAYERS, kvd, tpb * heads * HEAD)
        return [pool], None, lambda cs, b: [cs[0][b]]
    raise ValueError(kind)


def start_manager(tpb: int, mla: bool = False, cpu_blocks: int = 64) -> KVManager:
    model = ModelConfig(num_layers=LAYERS, num_kv_heads=1 if mla else HEADS, head_size=HEAD, use_mla=mla,
                        dtype=torch.float16)
    kv = KVManager(model, CacheConfig(num_cpu_blocks=cpu_blocks, tokens_per_block=tpb))
    kv.start()
    return kv


def register(kv: KVManager, caches, lay) -> None:
    if lay is None:
        kv.register_kv_caches(EngineLayout.from_block_views(caches))
    else:
        kv.register_kv_caches(caches, lay)


KINDS = ["layer_first", "layer_block", "block_first", "vllm_cpu", "trtllm_pool"]


@pytest.mark.parametrize("tpb", [16, 32, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_byte_exact(kind: str, tpb: int) -> None:
    seed = zlib.crc32(f"{kind}/{tpb}".encode())
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    caches, lay, block = make_caches(kind, tpb, gen)
    kv = start_manager(tpb)
    try:
        register(kv, caches, lay)
        n_blocks = 5
        tokens = random_tokens(rng, n_blocks * tpb + tpb // 2)  # a trailing partial block is never stored
        src = rng.permutation(NUM_BLOCKS)[:n_blocks]             # scattered, unsorted engine blocks
        mask = store(kv, tokens, src)
        assert mask.sum() == n_blocks * tpb and not mask[n_blocks * tpb:].any()
        original = {int(b): [t.clone() for t in block(caches, int(b))] for b in src}

        poison(caches)
        dst = rng.permutation(NUM_BLOCKS)[:n_blocks]
        got = load(kv, tokens, dst)
        assert got.sum() == n_blocks * tpb
        for s, d in zip(src, dst):
            for want, have in zip(original[int(s)], block(caches, int(d))):
                assert bitwise_equal(want, have), f"block {s} -> {d} differs"
        # Blocks that were not loaded into stay poisoned.
        untouched = sorted(set(range(NUM_BLOCKS)) - {int(d) for d in dst})
        for t in block(caches, untouched[0]):
            assert torch.isnan(t).all()
        assert_no_locks(kv)
    finally:
        kv.shutdown()


@pytest.mark.parametrize("kind", ["layer_first", "layer_block", "block_first"])
def test_mla_round_trip(kind: str) -> None:
    gen = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    caches, lay, block = make_caches(kind, 16, gen, mla=True)
    kv = start_manager(16, mla=True)
    try:
        register(kv, caches, lay)
        tokens = random_tokens(rng, 48)
        store(kv, tokens, [3, 9, 1])
        want = [[t.clone() for t in block(caches, b)] for b in (3, 9, 1)]
        poison(caches)
        load(kv, tokens, [0, 2, 4])
        for w, b in zip(want, (0, 2, 4)):
            assert all(bitwise_equal(x, y) for x, y in zip(w, block(caches, b)))
    finally:
        kv.shutdown()


def test_enum_layouts_share_the_host_block_layout() -> None:
    """A block stored from a per-layer engine loads into a block-first engine: the host layout is one."""
    tpb = 16
    gen = torch.Generator().manual_seed(5)
    rng = np.random.default_rng(5)
    src, src_lay, _ = make_caches("layer_first", tpb, gen)
    dst, dst_lay, _ = make_caches("block_first", tpb, gen)
    kv = start_manager(tpb)
    try:
        kv.register_kv_caches(src, src_lay)
        tokens = random_tokens(rng, 2 * tpb)
        store(kv, tokens, [7, 2])
        kv.register_kv_caches(dst, dst_lay)
        poison(dst)
        load(kv, tokens, [0, 1])
        for i, b in enumerate((7, 2)):
            for layer in range(LAYERS):
                for k in range(2):
                    assert bitwise_equal(src[layer][k, b], dst[0][i, layer, k])
    finally:
        kv.shutdown()


def test_many_blocks_in_one_task_use_every_copy_thread() -> None:
    tpb = 16
    gen = torch.Generator().manual_seed(21)
    rng = np.random.default_rng(21)
    caches = [torch.randn(2, 600, tpb, HEADS, HEAD, generator=gen, dtype=torch.float16) for _ in range(LAYERS)]
    lay = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, 600, tpb, HEADS, HEAD)
    kv = start_manager(tpb, cpu_blocks=600)
    try:
        kv.register_kv_caches(caches, lay)
        tokens = random_tokens(rng, 512 * tpb)
        src = rng.permutation(600)[:512]
        store(kv, tokens, src)
        want = [c[:, src].clone() for c in caches]
        poison(caches)
        dst = rng.permutation(600)[:512]
        task_id, mask = kv.get_match(tokens)
        kv.launch(task_id, slots_for(mask, dst, tpb))
        assert kv.wait(task_id)[task_id].ok
        for w, c in zip(want, caches):
            assert bitwise_equal(w, c[:, dst])
    finally:
        kv.shutdown()
