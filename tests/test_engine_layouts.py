"""Engine layouts as the copy engines see them, and the GPU data plane's behaviour on a machine without a GPU.

Layer groups and TP slices are checked here on CPU tensors with the host copy engine; the same layouts move
through the GPU engine in tests/test_gpu_transfer.py (``pytest -m gpu`` on the GPU machine).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, _core
from flexkv.core.cpu_tier import CpuTier
from flexkv.core.errors import LayoutError
from flexkv.core.gpu_plane import cuda_available, make_gpu_copy_engine
from flexkv.core.layout import EngineLayout, KVCacheLayoutType

from kv_helpers import FakeEngine

L, B, T, H, D = 3, 10, 16, 4, 8


def engine(kind: KVCacheLayoutType, gen: torch.Generator, heads: int = H) -> FakeEngine:
    """An engine fake of this file's shape, every block filled with random bytes."""
    eng = FakeEngine(kind, num_layers=L, num_blocks=B, tokens_per_block=T, num_kv_heads=heads, head_size=D,
                     dtype=torch.float16, gen=gen)
    eng.fill(range(B))
    return eng


@pytest.mark.parametrize("kind", list(KVCacheLayoutType), ids=lambda k: k.value)
def test_every_segment_knows_its_layer(kind: KVCacheLayoutType, gen: torch.Generator) -> None:
    layout = engine(kind, gen).engine_layout()
    grouped = layout.grouped_segments()
    assert grouped.shape == (len(layout.segments), 5)
    np.testing.assert_array_equal(grouped[:, :4], layout.segments)
    chunk = T * H * D * 2
    if kind is KVCacheLayoutType.BLOCKFIRST:  # a whole block is contiguous: one segment, done with the last layer
        assert grouped[:, 4].tolist() == [L - 1]
    elif kind is KVCacheLayoutType.LAYERBLOCK:  # K and V of a layer are adjacent: one segment per layer
        assert grouped[:, 4].tolist() == list(range(L))
        assert (grouped[:, 3] == 2 * chunk).all()
    else:
        assert grouped[:, 4].tolist() == [layer for layer in range(L) for _ in range(2)]
    # Host offsets grow with the layer: a layer-wise copy completes the host block front to back.
    assert (np.diff(grouped[np.argsort(grouped[:, 4], kind="stable"), 2]) > 0).all()


@pytest.mark.parametrize("kind", list(KVCacheLayoutType), ids=lambda k: k.value)
def test_tp_ranks_fill_their_slices_of_each_host_chunk(kind: KVCacheLayoutType, gen: torch.Generator,
                                                      rng: np.random.Generator) -> None:
    """Two ranks with half the heads each store the same blocks; the host block holds
    [layer][k|v][rank][tokens, heads/2, head] and each rank loads back exactly its own heads."""
    tp = 2
    ranks = [engine(kind, gen, heads=H // tp) for _ in range(tp)]
    layouts = [EngineLayout.from_kv_layout(ranks[r].kv_caches, ranks[r].kv_layout, tp_size=tp, tp_rank=r)
               for r in range(tp)]
    block_bytes = L * 2 * T * H * D * 2
    copy = _core.HostCopyEngine(2)
    host = np.full((B, block_bytes), 0xA5, dtype=np.uint8)
    ids = rng.permutation(B)
    for lay in layouts:
        lay.validate()
        assert lay.block_bytes == block_bytes
        copy.copy("engine_to_host", lay.segments, B, host.ctypes.data, block_bytes, B, ids, ids)

    def chunk(r: int, block: int, layer: int, kv: int) -> np.ndarray:
        """Rank r's bytes of one layer's K or V in one block (the fake reads a block as [layer][k|v][...])."""
        return ranks[r].read(block).view(L, 2, -1)[layer, kv].numpy()

    for b in range(B):
        want = np.concatenate([chunk(r, b, layer, kv) for layer in range(L) for kv in range(2) for r in range(tp)])
        np.testing.assert_array_equal(host[b], want)
    for r in range(tp):
        saved = [ranks[r].read(b) for b in range(B)]
        ranks[r].poison()
        copy.copy("host_to_engine", layouts[r].segments, B, host.ctypes.data, block_bytes, B, ids, ids)
        ranks[r].assert_blocks(range(B), saved)


def test_tp_layouts_that_do_not_fit_are_refused(gen: torch.Generator) -> None:
    eng = engine(KVCacheLayoutType.LAYERFIRST, gen)
    lay, tensors = eng.kv_layout, eng.kv_caches
    for size, rank in ((2, 2), (0, 0), (2, -1)):
        with pytest.raises(LayoutError, match="tp_rank must lie in"):
            EngineLayout.from_kv_layout(tensors, lay, tp_size=size, tp_rank=rank)
    good = EngineLayout.from_kv_layout(tensors, lay, tp_size=2, tp_rank=1)
    bad = EngineLayout(good.segments.copy(), good.num_blocks, good.block_bytes, tp_size=2, tp_rank=1)
    bad.segments[1, 2] = bad.segments[0, 2]  # two chunks of this rank on top of each other
    with pytest.raises(LayoutError, match="TP rank 1"):
        bad.validate()
    with pytest.raises(LayoutError, match="layers has 1 entries"):
        EngineLayout.from_block_views(tensors, layers=[0])


def test_cuda_sources_are_built_wherever_nvcc_is() -> None:
    if shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc"):
        assert _core.CUDA_BUILT, "nvcc is installed but this build has no GPU data plane"
    count = _core.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not _core.CUDA_BUILT:
        assert count == 0, "a build without CUDA reports CUDA devices"


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU path; this machine has a GPU")
def test_gpu_plane_without_a_gpu_says_so(make_kv, gen: torch.Generator) -> None:
    with pytest.raises(RuntimeError, match="no CUDA device is usable|no CUDA support"):
        _core.GpuCopyEngine(0)
    cpu = engine(KVCacheLayoutType.LAYERFIRST, gen).engine_layout()
    on_gpu = EngineLayout(cpu.segments, cpu.num_blocks, cpu.block_bytes, device="cuda:0")
    tier = CpuTier(4, cpu.block_bytes, 0.0)
    try:
        with pytest.raises(LayoutError, match="cuda:0.*(no CUDA device is usable|no CUDA support)"):
            make_gpu_copy_engine(CacheConfig(tokens_per_block=T, num_cpu_blocks=4), on_gpu, tier)
    finally:
        tier.close()
    kv = make_kv(register=False, num_layers=L, num_kv_heads=H, head_size=D, num_cpu_blocks=8).kv
    with pytest.raises(LayoutError, match="cuda:0"):
        kv.register_kv_caches(on_gpu)
    assert kv.engine_layout is None
