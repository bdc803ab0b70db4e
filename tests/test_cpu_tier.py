"""The CPU tier's shared-memory segment: visible to other processes, removed on close and after a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexkv import _core
from flexkv.core.cpu_tier import CpuTier, remove_orphaned_segments

SHM = Path("/dev/shm")


def test_segment_is_shared_and_removed_on_close() -> None:
    tier = CpuTier(num_blocks=8, block_bytes=4096, evict_ratio=0.0)
    name = tier.shm_name
    assert (SHM / name.lstrip("/")).exists()
    data = np.random.default_rng(3).integers(0, 256, (8, 4096), dtype=np.uint8)
    tier.blocks()[:] = data
    other = _core.ShmRegion.open(name)  # as an engine worker process maps it
    assert np.array_equal(other.as_array().reshape(8, 4096), data)
    other.close()
    view = tier.blocks()
    tier.close()
    assert not (SHM / name.lstrip("/")).exists()
    assert np.array_equal(view, data)  # a view outlives close(): it holds the mapping
    tier.close()  # idempotent


def test_segments_of_another_pid_namespace_are_never_removed() -> None:
    foreign = SHM / "flexkv-1-999999999-0123456789ab"  # namespace inode 1: not ours; pid: not alive here
    foreign.write_bytes(b"x")
    try:
        assert foreign.name not in remove_orphaned_segments()
        assert foreign.exists()
    finally:
        foreign.unlink()


def test_segment_of_a_killed_process_is_removed_by_the_next_tier() -> None:
    code = ("import os; from flexkv.core.cpu_tier import CpuTier; t = CpuTier(4, 4096, 0.0); "
            "print(t.shm_name, flush=True); os._exit(0)")  # exits without cleanup, as a crash would
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()
    assert (SHM / name.lstrip("/")).exists()
    assert name.lstrip("/") in remove_orphaned_segments()
    assert not (SHM / name.lstrip("/")).exists()
    mine = CpuTier(num_blocks=2, block_bytes=4096, evict_ratio=0.0)  # a live process's segment stays
    assert mine.shm_name.lstrip("/") not in remove_orphaned_segments()
    assert (SHM / mine.shm_name.lstrip("/")).exists()
    mine.close()


def test_segment_too_large_for_dev_shm_is_a_clear_error() -> None:
    st = os.statvfs("/dev/shm")
    free = st.f_blocks * st.f_frsize  # twice the whole filesystem: refused before any page is taken
    with pytest.raises(RuntimeError) as exc:
        CpuTier(num_blocks=2, block_bytes=free, evict_ratio=0.0)
    assert "/dev/shm" in str(exc.value) and "num_cpu_blocks" in str(exc.value), str(exc.value)
