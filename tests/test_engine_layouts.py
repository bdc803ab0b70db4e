"""Engine layouts as the copy engines see them, and the GPU data plane's behaviour on a machine without a GPU.

Layer groups and TP slices are checked here on CPU tensors with the host copy engine; the same layouts move
through the GPU engine in tests/test_gpu_transfer.py (``pytest -m gpu`` on the GPU machine).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, KVManager, ModelConfig, _core
from flexkv.core.cpu_tier import CpuTier
from flexkv.core.errors import LayoutError
from flexkv.core.gpu_plane import cuda_available, make_gpu_copy_engine
from flexkv.core.layout import EngineLayout, KVCacheLayout, KVCacheLayoutType

L, B, T, H, D = 3, 10, 16, 4, 8


def layer_tensors(layout: KVCacheLayout, gen: torch.Generator) -> list[torch.Tensor] | torch.Tensor:
    if layout.type is KVCacheLayoutType.BLOCKFIRST:
        return torch.randn(layout.kv_shape, generator=gen).to(torch.float16)
    return [torch.randn(layout.kv_shape[1:], generator=gen).to(torch.float16) for _ in range(layout.num_layer)]


@pytest.mark.parametrize("kind", list(KVCacheLayoutType), ids=lambda k: k.value)
def test_every_segment_knows_its_layer(kind: KVCacheLayoutType) -> None:
    lay = KVCacheLayout(kind, L, B, T, H, D)
    layout = EngineLayout.from_kv_layout(layer_tensors(lay, torch.Generator().manual_seed(1)), lay)
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
def test_tp_ranks_fill_their_slices_of_each_host_chunk(kind: KVCacheLayoutType) -> None:
    """Two ranks with half the heads each store the same blocks; the host block holds
    [layer][k|v][rank][tokens, heads/2, head] and each rank loads back exactly its own heads."""
    tp = 2
    gen = torch.Generator().manual_seed(7)
    half = KVCacheLayout(kind, L, B, T, H // tp, D)
    ranks = [layer_tensors(half, gen) for _ in range(tp)]
    layouts = [EngineLayout.from_kv_layout(ranks[r], half, tp_size=tp, tp_rank=r) for r in range(tp)]
    block_bytes = L * 2 * T * H * D * 2
    copy = _core.HostCopyEngine(2)
    host = np.full((B, block_bytes), 0xA5, dtype=np.uint8)
    ids = np.random.default_rng(0).permutation(B)
    for lay in layouts:
        lay.validate()
        assert lay.block_bytes == block_bytes
        copy.copy("engine_to_host", lay.segments, B, host.ctypes.data, block_bytes, B, ids, ids)

    def chunk(r: int, block: int, layer: int, kv: int) -> np.ndarray:
        t = ranks[r][block, layer, kv] if kind is KVCacheLayoutType.BLOCKFIRST else (
            ranks[r][layer][kv, block] if kind is KVCacheLayoutType.LAYERFIRST else ranks[r][layer][block, kv])
        return t.contiguous().view(torch.uint8).numpy().ravel()

    for b in range(B):
        want = np.concatenate([chunk(r, b, layer, kv) for layer in range(L) for kv in range(2) for r in range(tp)])
        np.testing.assert_array_equal(host[b], want)
    for r in range(tp):
        tensors = ranks[r] if isinstance(ranks[r], list) else [ranks[r]]
        saved = [t.clone() for t in tensors]
        for t in tensors:
            t.fill_(float("nan"))
        copy.copy("host_to_engine", layouts[r].segments, B, host.ctypes.data, block_bytes, B, ids, ids)
        for t, s in zip(tensors, saved):
            assert torch.equal(t.view(torch.int16), s.view(torch.int16))


def test_tp_layouts_that_do_not_fit_are_refused() -> None:
    lay = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, L, B, T, H, D)
    tensors = layer_tensors(lay, torch.Generator().manual_seed(2))
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
    assert _core.cuda_device_count() >= 0


@pytest.mark.skipif(cuda_available(), reason="checks the no-GPU path; this machine has a GPU")
def test_gpu_plane_without_a_gpu_says_so() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device is usable|no CUDA support"):
        _core.GpuCopyEngine(0)
    lay = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, L, B, T, H, D)
    cpu = EngineLayout.from_kv_layout(layer_tensors(lay, torch.Generator().manual_seed(3)), lay)
    on_gpu = EngineLayout(cpu.segments, cpu.num_blocks, cpu.block_bytes, device="cuda:0")
    tier = CpuTier(4, cpu.block_bytes, 0.0)
    try:
        with pytest.raises(LayoutError, match="cuda:0.*(no CUDA device is usable|no CUDA support)"):
            make_gpu_copy_engine(CacheConfig(tokens_per_block=T, num_cpu_blocks=4), on_gpu, tier)
    finally:
        tier.close()
    model = ModelConfig(num_layers=L, num_kv_heads=H, head_size=D, dtype="float16")
    with KVManager(model, CacheConfig(tokens_per_block=T, num_cpu_blocks=8)) as kv:
        with pytest.raises(LayoutError, match="cuda:0"):
            kv.register_kv_caches(on_gpu)
        assert kv.engine_layout is None
