"""The CPU tier: host blocks in POSIX shared memory, indexed by a RadixIndex."""

from __future__ import annotations

import os
import uuid

import numpy as np

from flexkv import _core


class CpuTier:
    """``num_blocks`` host blocks of ``block_bytes`` each, in one shared-memory segment.

    The segment is named so that engine worker processes can map it; it is
    removed when the tier closes (or its owning process exits normally).
    """

    def __init__(self, num_blocks: int, block_bytes: int, evict_ratio: float, huge_pages: bool = False) -> None:
        self.num_blocks = int(num_blocks)
        self.block_bytes = int(block_bytes)
        self.shm_name = f"/flexkv-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.region = _core.ShmRegion.create(self.shm_name, self.num_blocks * self.block_bytes, huge_pages)
        self.index = _core.RadixIndex(self.num_blocks, float(evict_ratio))

    @property
    def base(self) -> int:
        return int(self.region.address)

    def blocks(self) -> np.ndarray:
        """A (num_blocks, block_bytes) uint8 view of the tier's bytes."""
        return self.region.as_array().reshape(self.num_blocks, self.block_bytes)

    def close(self) -> None:
        self.region.close()
