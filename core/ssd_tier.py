"""The SSD tier: whole host blocks on local NVMe behind a RadixIndex of their own.

Blocks reach the SSD only from the CPU tier (write-through after a put) and
leave it only into the CPU tier (promotion before a get): the SSD never talks
to the engine. Every stored block carries a header (namespace key, parent key,
position, token ids, checksums); a read that does not match is a miss and the
block is dropped. On start the index is rebuilt from the headers, so the cache
survives a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np

from flexkv import _core

from .config import CacheConfig, format_bytes
from .cpu_tier import CpuTier
from .errors import ConfigError

logger = logging.getLogger("flexkv")

IO_ALIGN = 4096  # O_DIRECT buffers and offsets
_WATERMARK_STEP = 4096  # slots between two updates of the written-slot mark


@dataclass
class SsdIoResult:
    """Per block of a batch: True where the block moved and verified."""

    ok: np.ndarray
    mismatch: np.ndarray  # True where the bytes on disk were not what the index said
    io_errors: int


class SsdTier:
    """``num_ssd_blocks`` slots striped over ``ssd_cache_dir``'s directories, files preallocated."""

    def __init__(self, cache_config: CacheConfig, block_bytes: int, fingerprint: str, *, io_engine: str = "auto",
                 fault_injection: bool = False) -> None:
        dirs = cache_config.ssd_cache_dirs
        if not dirs:
            raise ConfigError("cache_config.ssd_cache_dir: enable_ssd needs at least one directory "
                              "(several are separated by ';')", "cache_config.ssd_cache_dir")
        for d in dirs:
            _check_dir(d)
        self._locks = _lock_dirs(dirs, fingerprint)
        self._watermark_path = os.path.join(dirs[0], f".flexkv-{_tag(fingerprint)}.watermark")
        self.num_blocks = int(cache_config.num_ssd_blocks)
        self.block_bytes = int(block_bytes)
        self.tokens_per_block = int(cache_config.tokens_per_block)
        try:
            self.store = _core.SsdStore(dirs, self.num_blocks, self.block_bytes, self.tokens_per_block, fingerprint,
                                        io_engine=io_engine, queue_depth=int(cache_config.ssd_cache_iouring_entries),
                                        fault_injection=fault_injection)
        except (RuntimeError, ValueError) as e:
            self.close()
            if io_engine != "auto" and "io_uring" in str(e):
                raise ConfigError(f"ssd_io_engine={io_engine!r}: {e}; use 'auto' to fall back to threads",
                                  "ssd_io_engine") from e
            raise ConfigError(f"cache_config.ssd_cache_dir: {e}", "cache_config.ssd_cache_dir") from e
        if self.store.fallback_reason:
            logger.warning("SSD tier: io_uring unavailable (%s); using the thread-pool fallback",
                           self.store.fallback_reason)
        for foreign in self.store.foreign_subdirs():
            logger.warning("SSD tier: ignoring %s: written for another model or KV layout; it is never reused",
                           foreign)
        self.index = _core.RadixIndex(self.num_blocks, float(cache_config.evict_ratio))
        self.restored = self._restore()
        logger.info("SSD tier: %d slots of %s over %s (%s), %d blocks restored", self.num_blocks,
                    format_bytes(self.store.slot_bytes), dirs, self.store.io_engine, self.restored)

    def _restore(self) -> int:
        """Rebuilds the index from the headers of the slots ever written: those below the persisted
        written-slot mark (without a mark, every slot)."""
        limit = -1
        try:
            with open(self._watermark_path) as f:
                limit = int(f.read().strip())
        except (OSError, ValueError):
            pass
        slots, keys, parents, positions = self.store.scan(limit)
        self._high_water = int(slots.max()) + 1 if len(slots) else 0
        self._persisted = -1
        self._note_high_water(self._high_water, force=True)
        if len(slots) == 0:
            return 0
        restored, left_out = self.index.restore(keys, parents, positions, slots)
        if len(left_out):
            self.store.invalidate(left_out)
        return int(restored)

    def write(self, cpu: CpuTier, cpu_ids: np.ndarray, slots: np.ndarray, keys: np.ndarray, parents: np.ndarray,
              positions: np.ndarray, tokens: np.ndarray) -> SsdIoResult:
        """Writes CPU blocks to SSD slots; blocks locked by the caller on both tiers."""
        if len(slots):
            self._note_high_water(int(slots.max()) + 1)
        status = self.store.write(slots, keys, parents, positions, tokens, cpu.addresses(cpu_ids))
        return _result(status)

    def read(self, cpu: CpuTier, cpu_ids: np.ndarray, slots: np.ndarray, keys: np.ndarray, parents: np.ndarray,
             positions: np.ndarray, tokens: np.ndarray) -> SsdIoResult:
        """Reads SSD slots into CPU blocks and verifies each against what the index expects."""
        status = self.store.read(slots, keys, parents, positions, tokens, cpu.addresses(cpu_ids))
        return _result(status)

    def _note_high_water(self, end: int, force: bool = False) -> None:
        """Remembers on disk, rounded up to _WATERMARK_STEP slots, how far slots have been written, so a
        restart scans only those. The mark is written before the slots it covers, so it is never behind."""
        self._high_water = max(self._high_water, end)
        if force or self._high_water > self._persisted:
            target = -(-self._high_water // _WATERMARK_STEP) * _WATERMARK_STEP
            try:
                tmp = self._watermark_path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(str(target))
                os.replace(tmp, self._watermark_path)
                self._persisted = target
            except OSError as e:  # only costs a longer scan at the next start
                logger.warning("SSD tier: cannot record the written-slot mark in %s: %s", self._watermark_path, e)
                self._persisted = self._high_water

    def close(self) -> None:
        """Lets another process use the directories."""
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def drop(self, slots: np.ndarray) -> None:
        """Makes locked slots unreadable (their bytes were wrong) and erases their headers."""
        if len(slots):
            self.index.set_ready(slots, False)
            self.store.invalidate(slots)


def _result(status: np.ndarray) -> SsdIoResult:
    return SsdIoResult(status == 0, status == 1, int((status == 2).sum()))


def _tag(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def _lock_dirs(dirs: list[str], fingerprint: str) -> list[int]:
    """Takes an exclusive lock per directory and fingerprint: two caches writing the same slots would
    only ever turn each other's blocks into misses."""
    tag = _tag(fingerprint)
    fds: list[int] = []
    try:
        for d in dirs:
            try:
                os.makedirs(d, exist_ok=True)
                fd = os.open(os.path.join(d, f".flexkv-{tag}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ConfigError(f"cache_config.ssd_cache_dir: cannot use {d}: {e.strerror}; make it a writable "
                                  "directory on a local disk", "cache_config.ssd_cache_dir") from e
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"cache_config.ssd_cache_dir: {d} is in use by another FlexKV cache of the same "
                                  "model (another process, or another KVManager in this one); give each instance "
                                  "its own ssd_cache_dir", "cache_config.ssd_cache_dir") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _check_dir(d: str) -> None:
    """A clear error for a directory that cannot hold the tier, before anything is written."""
    path = os.path.abspath(d)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"cache_config.ssd_cache_dir: {probe} is not a directory; point ssd_cache_dir at a "
                          "directory on a local disk", "cache_config.ssd_cache_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "exists but is read-only" if probe == path else f"does not exist and {probe} is read-only"
        raise ConfigError(f"cache_config.ssd_cache_dir: {path} {what}; make it writable for this user or choose "
                          "another directory", "cache_config.ssd_cache_dir")
