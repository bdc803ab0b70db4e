"""The CPU tier: host blocks in POSIX shared memory, indexed by a RadixIndex."""

from __future__ import annotations

import logging
import os
import re
import uuid
import weakref

import numpy as np

from flexkv import _core

logger = logging.getLogger("flexkv")

_SHM_DIR = "/dev/shm"
_SHM_NAME = re.compile(r"^flexkv-(\d+)-(\d+)-[0-9a-f]{12}$")  # flexkv-<pid namespace>-<pid>-<random>


def _pid_namespace() -> int:
    """The inode of this process's PID namespace: PIDs mean something only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class CpuTier:
    """``num_blocks`` host blocks of ``block_bytes`` each, in one shared-memory segment.

    The segment is named ``/flexkv-<pid namespace>-<pid>-<random>`` so that
    engine worker processes can map it. It is removed when the tier closes or
    the process exits; segments left by a killed process of the same PID
    namespace are removed by the next tier created there (containers that share
    /dev/shm but not PIDs never remove each other's segments).
    """

    def __init__(self, num_blocks: int, block_bytes: int, evict_ratio: float, huge_pages: bool = False,
                 block_align: int = 1) -> None:
        self.num_blocks = int(num_blocks)
        self.block_bytes = int(block_bytes)
        # Blocks start every block_stride bytes; a slower tier doing direct I/O asks for 4096-byte alignment.
        self.block_stride = -(-self.block_bytes // block_align) * block_align
        remove_orphaned_segments()
        self.shm_name = f"/flexkv-{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.region = _core.ShmRegion.create(self.shm_name, self.num_blocks * self.block_stride, huge_pages)
        self._finalizer = weakref.finalize(self, self.region.close)
        self.index = _core.RadixIndex(self.num_blocks, float(evict_ratio))

    @property
    def base(self) -> int:
        return int(self.region.address)

    def blocks(self) -> np.ndarray:
        """A (num_blocks, block_bytes) uint8 view of the tier's bytes; it keeps the mapping alive."""
        return self.region.as_array().reshape(self.num_blocks, self.block_stride)[:, : self.block_bytes]

    def addresses(self, ids: np.ndarray) -> np.ndarray:
        """The address of each block id, as uint64."""
        return (self.base + ids.astype(np.uint64) * np.uint64(self.block_stride)).astype(np.uint64)

    def close(self) -> None:
        self._finalizer()


def remove_orphaned_segments(shm_dir: str = _SHM_DIR) -> list[str]:
    """Unlinks CPU-tier segments whose creating process (in this PID namespace) no longer exists; returns
    their names."""
    removed = []
    own_ns = _pid_namespace()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        m = _SHM_NAME.match(name)
        if m is None or not own_ns or int(m.group(1)) != own_ns or _alive(int(m.group(2))):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            continue
    if removed:
        logger.info("removed %d shared-memory segment(s) left by exited processes: %s", len(removed), removed)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
