"""The CPU tier on its own: host blocks in anonymous shared memory (the control plane's tier, for tools and
tests that need only the memory), and :func:`map_cpu_tier`, with which another process maps a tier.

The memory is a memfd (``csrc/pool/memfd_region.h``): it has no name in /dev/shm or anywhere else. Other
processes of the same user get it through the tier's socket (``tier_info()["socket"]``, an abstract Unix socket
that vanishes with the owning process; ``csrc/pool/region_share.h``), and the kernel frees it once the owner and
every mapper are gone, however they end."""

from __future__ import annotations

from typing import Any

import numpy as np

from flexkv import _core


class CpuTier:
    """``num_blocks`` host blocks of ``block_bytes`` each, that processes of the same user can map through
    :meth:`tier_info` and :func:`map_cpu_tier`."""

    def __init__(self, num_blocks: int, block_bytes: int, evict_ratio: float, huge_pages: bool = False,
                 block_align: int = 1) -> None:
        self._tier: _core.CpuTier | None = _core.CpuTier(int(num_blocks), int(block_bytes), int(block_align),
                                                          float(evict_ratio), bool(huge_pages))
        self.num_blocks = int(num_blocks)
        self.block_bytes = int(block_bytes)
        self.block_stride = int(self._tier.block_stride)
        self.base = int(self._tier.base)
        self._info = dict(self._tier.tier_info())

    def tier_info(self) -> dict[str, Any]:
        """``{"socket", "num_blocks", "block_stride", "block_bytes", "size"}``: what :func:`map_cpu_tier` takes."""
        return dict(self._info)

    @property
    def refused(self) -> int:
        """Connections to the tier's socket refused because the peer runs as another user."""
        return int(self._tier.refused) if self._tier is not None else 0

    def blocks(self) -> np.ndarray:
        """A (num_blocks, block_bytes) uint8 view of the tier's bytes; it keeps the mapping alive."""
        if self._tier is None:
            raise ValueError("the CPU tier is closed")
        return self._tier.as_array().reshape(self.num_blocks, self.block_stride)[:, : self.block_bytes]

    def addresses(self, ids: np.ndarray) -> np.ndarray:
        """The address of each block id, as uint64."""
        return (self.base + ids.astype(np.uint64) * np.uint64(self.block_stride)).astype(np.uint64)

    def close(self) -> None:
        """Stops handing the memory out and drops this tier's hold on it (views and other processes' mappings
        stay valid). Idempotent."""
        if self._tier is not None:
            self._tier.close()
        self._tier = None


def map_cpu_tier(tier_info: dict[str, Any], timeout_s: float = 10.0) -> Any:
    """Maps the CPU tier ``tier_info`` describes (``KVManager.tier_info()``, :meth:`CpuTier.tier_info`) into
    this process: a ``_core.SharedRegion`` with ``address``, ``size``, ``as_array()`` and ``close()`` that keeps
    the mapping. Raises RuntimeError naming the cause: the owner has exited, refuses this process's user, or
    holds a tier of another geometry."""
    return _core.map_cpu_tier(tier_info, float(timeout_s))
