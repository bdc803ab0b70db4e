"""The CPU tier on its own: host blocks in one POSIX shared-memory segment (the control plane's tier, for
tools and tests that need only the memory). Segment names and clean-up are the C++ core's: see
``csrc/control/cpu_tier.h``."""

from __future__ import annotations

import numpy as np

from flexkv import _core


class CpuTier:
    """``num_blocks`` host blocks of ``block_bytes`` each, in a segment named
    ``/flexkv-<pid namespace>-<pid>-<random>`` that engine worker processes can map."""

    def __init__(self, num_blocks: int, block_bytes: int, evict_ratio: float, huge_pages: bool = False,
                 block_align: int = 1) -> None:
        self._tier: _core.CpuTier | None = _core.CpuTier(int(num_blocks), int(block_bytes), int(block_align),
                                                          float(evict_ratio), bool(huge_pages))
        self.shm_name = self._tier.shm_name
        self.num_blocks = int(num_blocks)
        self.block_bytes = int(block_bytes)
        self.block_stride = int(self._tier.block_stride)
        self.base = int(self._tier.base)

    def blocks(self) -> np.ndarray:
        """A (num_blocks, block_bytes) uint8 view of the tier's bytes; it keeps the mapping alive."""
        if self._tier is None:
            raise ValueError("the CPU tier is closed")
        return self._tier.as_array().reshape(self.num_blocks, self.block_stride)[:, : self.block_bytes]

    def addresses(self, ids: np.ndarray) -> np.ndarray:
        """The address of each block id, as uint64."""
        return (self.base + ids.astype(np.uint64) * np.uint64(self.block_stride)).astype(np.uint64)

    def close(self) -> None:
        """Removes the segment (views already handed out stay valid). Idempotent."""
        self._tier = None


def remove_orphaned_segments(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlinks CPU-tier segments whose creating process (in this PID namespace) no longer exists; returns
    their names."""
    return list(_core.remove_orphaned_segments(shm_dir))
