"""The GPU data plane: a GpuCopyEngine for an engine whose KV memory is on a CUDA device.

The CPU tier's shared memory is registered as pinned memory once, when the
engine's KV tensors are registered. ``use_ce_transfer_h2d`` / ``_d2h`` pick the
copy-engine path (DMA, no SMs) per direction; otherwise the copy kernel runs on
``transfer_sms_h2d`` / ``_d2h`` thread blocks.
"""

from __future__ import annotations

import logging
from typing import Any

from flexkv import _core

from .config import CacheConfig
from .cpu_tier import CpuTier
from .errors import LayoutError
from .layout import EngineLayout

logger = logging.getLogger("flexkv")

# Below this chunk size the copy engine spends more time per chunk setting up than moving bytes
# (benchmarks/gpu_transfer.py, BENCHMARKS.md).
_CE_MIN_CHUNK = 64 << 10


def cuda_available() -> bool:
    """True when this build has the GPU data plane and a CUDA device is usable."""
    return bool(_core.CUDA_BUILT) and _core.cuda_available()


def make_gpu_copy_engine(cache_config: CacheConfig, layout: EngineLayout, tier: CpuTier | Any) -> tuple[Any, int]:
    """A GpuCopyEngine for ``layout``'s device with the CPU tier registered (pinned) and ``layout`` registered
    in it (which checks that every segment lies in that device's memory): returns (engine, layout id), the id
    that the engine's ``submit`` takes. ``tier`` is the CpuTier, or any view of it with ``base``,
    ``num_blocks`` and ``block_stride`` (a worker process's mapping). Raises LayoutError naming what to
    change."""
    if not _core.CUDA_BUILT:
        raise LayoutError(f"the KV tensors live on {layout.device}, but this FlexKV build has no CUDA support "
                          "(nvcc was not found when it was built); reinstall FlexKV with the CUDA toolkit on PATH")
    if not _core.cuda_available():
        raise LayoutError(f"the KV tensors live on {layout.device}, but no CUDA device is usable in this process")
    path_h2d = "copy_engine" if cache_config.use_ce_transfer_h2d else "staged"
    path_d2h = "copy_engine" if cache_config.use_ce_transfer_d2h else "staged"
    try:
        engine = _core.GpuCopyEngine(layout.cuda_index, path_h2d, path_d2h, cache_config.transfer_sms_h2d,
                                     cache_config.transfer_sms_d2h)
        engine.register_host(tier.base, tier.num_blocks * tier.block_stride)
        layout_id = engine.register_layout(layout.grouped_segments(), layout.num_blocks, tier.base,
                                           tier.block_stride, tier.num_blocks)
    except (RuntimeError, ValueError) as e:
        raise LayoutError(f"the GPU data plane could not start for {layout.device}: {e}") from e
    smallest = int(layout.segments[:, 3].min())
    if (cache_config.use_ce_transfer_h2d or cache_config.use_ce_transfer_d2h) and smallest < _CE_MIN_CHUNK:
        logger.warning("use_ce_transfer_*: the engine layout moves chunks of %d bytes; the copy engine is slow below "
                       "%d KiB chunks; the default path (use_ce_transfer_* false) is faster for this layout",
                       smallest, _CE_MIN_CHUNK >> 10)
    return engine, layout_id
