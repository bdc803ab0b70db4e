"""PageStore: FlexKV's tiers for pages named by opaque keys, for engines that hash pages themselves.

SGLang's HiCache names every page by a SHA-256 chain over its tokens and asks a storage backend whether
pages exist, to store them and to load them, a batch of up to 128 at a time, from its own threads. A
PageStore keeps such pages in FlexKV's CPU tier (the cache, and the staging area of every SSD transfer)
and, with ``enable_ssd``, on the SSD tier, written through synchronously and found again after a restart.

Every page is an entry of its own (a one-block chain under the namespace): the caller's key already names
the whole prefix. Keys are the first 128 bits of the caller's hash XOR the namespace's key, so two
namespaces never share a page. The caller's memory is described by an EngineLayout whose blocks are its
pages; the bytes move with the host copy engine, the SSD I/O in C++; Python only plans. A page that does
not verify on SSD (key, checksums) is a miss, counted, and its slot dropped.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexkv import _core

from .config import CacheConfig, ModelConfig
from .cpu_tier import CpuTier
from .errors import LayoutError
from .layout import EngineLayout
from .resources import require_resources
from .ssd_tier import IO_ALIGN, SsdTier

logger = logging.getLogger("flexkv")


@dataclass
class PageStoreStats:
    exists_queries: int = 0
    exists_hits: int = 0
    pages_stored: int = 0        # new pages copied in
    pages_already_held: int = 0  # stores of pages the store had
    pages_not_stored: int = 0    # no block could be had (everything locked)
    pages_loaded: int = 0
    pages_missed: int = 0        # asked for, not delivered
    ssd_writes: int = 0
    ssd_reads: int = 0
    ssd_mismatches: int = 0
    ssd_io_errors: int = 0


def keys_from_hex(names: Sequence[str], namespace_key: np.ndarray) -> np.ndarray:
    """(n, 2) uint64 keys from hex digests of at least 32 digits (SGLang's 64-digit SHA-256 page hashes)."""
    if len(names) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    try:
        raw = bytes.fromhex("".join(str(n)[:32] for n in names))
    except ValueError as e:
        raise ValueError(f"page keys must be hex digests of at least 32 digits: {e}") from None
    if len(raw) != 16 * len(names):
        raise ValueError("page keys must be hex digests of at least 32 digits (128 bits)")
    keys = np.frombuffer(raw, dtype="<u8").reshape(-1, 2).copy()
    keys ^= namespace_key.reshape(1, 2)
    return keys


class PageStore:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, *, namespace: str, layout_tag: str,
                 num_copy_threads: int = 2, ssd_io_engine: str = "auto") -> None:
        model_config.validate()
        cache_config.validate()
        self.cache_config = cache_config.resolved(model_config)
        self.model_config = model_config
        self.block_bytes = model_config.block_bytes(self.cache_config.tokens_per_block)
        self.namespace = json.dumps(["flexkv-pages-v1", model_config.fingerprint(),
                                     self.cache_config.tokens_per_block, layout_tag, namespace])
        self.namespace_key = np.asarray(_core.namespace_key(self.namespace), dtype=np.uint64).reshape(2)
        require_resources(self.cache_config, model_config)
        self._ssd: SsdTier | None = None
        if self.cache_config.enable_ssd:
            self._ssd = SsdTier(self.cache_config, self.block_bytes,
                                json.dumps(["flexkv-pages-ssd-v1", self.namespace, self.block_bytes]),
                                io_engine=ssd_io_engine)
        try:
            self._cpu = CpuTier(self.cache_config.num_cpu_blocks, self.block_bytes, self.cache_config.evict_ratio,
                                self.cache_config.use_hugepage_cpu_buffer,
                                block_align=IO_ALIGN if self._ssd else 1)
        except BaseException:
            if self._ssd is not None:
                self._ssd.close()
            raise
        self._copy = _core.HostCopyEngine(num_copy_threads)
        self._lock = threading.Lock()  # the counters only: the indexes are thread-safe, blocks are locked
        self.stats = PageStoreStats()

    # ------------------------------------------------------------------------------------- queries

    def keys(self, names: Sequence[str]) -> np.ndarray:
        return keys_from_hex(names, self.namespace_key)

    def exists(self, keys: np.ndarray) -> int:
        """How many leading keys the store holds (in the CPU tier or on SSD)."""
        held = self._cpu.index.contains_each(keys)
        if self._ssd is not None and not held.all():
            held |= self._ssd.index.contains_each(keys)
        n = int(np.argmin(held)) if not held.all() else len(keys)
        with self._lock:
            self.stats.exists_queries += 1
            self.stats.exists_hits += n
        return n

    # --------------------------------------------------------------------------------------- store

    def put(self, keys: np.ndarray, layout: EngineLayout, pages: np.ndarray) -> np.ndarray:
        """Copies page ``pages[i]`` of ``layout`` in under ``keys[i]``; returns per page whether the store
        holds it now. Pages it already holds are not copied again."""
        self._check(layout, pages, len(keys))
        cpu = self._cpu
        ids, fresh = cpu.index.reserve_each(keys)
        handled = len(ids)
        new = np.flatnonzero(fresh)
        if len(new):
            new_ids = ids[new]
            try:
                self._copy.copy("engine_to_host", layout.segments, layout.num_blocks, cpu.base, cpu.block_stride,
                                cpu.num_blocks, pages[new].astype(np.int64), new_ids.astype(np.int64))
                if self._ssd is not None:
                    self._write_through(keys[new], new_ids)
            except BaseException:
                cpu.index.release(new_ids)
                raise
            cpu.index.commit(new_ids)
        stored = np.zeros(len(keys), dtype=bool)
        stored[:handled] = True
        with self._lock:
            self.stats.pages_stored += len(new)
            self.stats.pages_already_held += handled - len(new)
            self.stats.pages_not_stored += len(keys) - handled
        return stored

    def _write_through(self, keys: np.ndarray, cpu_ids: np.ndarray) -> None:
        """Writes locked CPU blocks to SSD slots; a page that cannot be written stays in the CPU tier only."""
        ssd = self._ssd
        assert ssd is not None
        slots, fresh = ssd.index.reserve_each(keys)
        todo = np.flatnonzero(fresh)
        if len(todo) == 0:
            return
        write_slots = slots[todo]
        n = len(todo)
        result = ssd.write(self._cpu, cpu_ids[todo], write_slots, keys[todo], self._parents(n),
                           np.zeros(n, dtype=np.int64), self._tokens(n))
        ok = write_slots[result.ok]
        bad = write_slots[~result.ok]
        if len(ok):
            ssd.index.commit(ok)
        if len(bad):
            ssd.index.release(bad)
        with self._lock:
            self.stats.ssd_writes += len(ok)
            self.stats.ssd_io_errors += result.io_errors
        if len(bad):
            logger.warning("FlexKV page store: %d of %d pages could not be written to SSD", len(bad), n)

    # ---------------------------------------------------------------------------------------- load

    def get(self, keys: np.ndarray, layout: EngineLayout, pages: np.ndarray) -> int:
        """Copies the leading held pages into ``pages[i]`` of ``layout``; returns how many it copied."""
        self._check(layout, pages, len(keys))
        cpu = self._cpu
        held = cpu.index.acquire_each(keys)
        n_cpu = len(held)
        promoted = np.zeros(0, dtype=np.int32)
        if self._ssd is not None and n_cpu < len(keys):
            promoted = self._promote(keys[n_cpu:])
        ids = np.concatenate([held, promoted]).astype(np.int32)
        try:
            if len(ids):
                self._copy.copy("host_to_engine", layout.segments, layout.num_blocks, cpu.base, cpu.block_stride,
                                cpu.num_blocks, pages[: len(ids)].astype(np.int64), ids.astype(np.int64))
        finally:
            if len(ids):
                cpu.index.release(ids)
        with self._lock:
            self.stats.pages_loaded += len(ids)
            self.stats.pages_missed += len(keys) - len(ids)
        return len(ids)

    def _promote(self, keys: np.ndarray) -> np.ndarray:
        """Reads the leading SSD pages of ``keys`` into new CPU blocks; returns them ready and locked."""
        ssd = self._ssd
        assert ssd is not None
        cpu = self._cpu
        slots = ssd.index.acquire_each(keys)
        if len(slots) == 0:
            return np.zeros(0, dtype=np.int32)
        ids, fresh = cpu.index.reserve_each(keys[: len(slots)])
        # Only fresh CPU blocks are filled here; another thread storing the same page stops the run.
        n = len(ids) if fresh.all() else int(np.argmin(fresh))
        if n < len(ids):
            cpu.index.release(ids[n:][fresh[n:]])
        ids = ids[:n]
        try:
            result = ssd.read(cpu, ids, slots[:n], keys[:n], self._parents(n), np.zeros(n, dtype=np.int64),
                              self._tokens(n)) if n else None
        except BaseException:
            cpu.index.release(ids)
            ssd.index.release(slots)
            raise
        good = n if result is None or result.ok.all() else int(np.argmin(result.ok))
        if result is not None and result.mismatch.any():
            ssd.drop(slots[:n][result.mismatch])
            logger.warning("FlexKV page store: %d SSD pages failed verification and were dropped",
                           int(result.mismatch.sum()))
        cpu.index.set_ready(ids[:good], True)
        cpu.index.release(ids[good:])  # unready: rewritten by a later store or evicted
        ssd.index.release(slots)
        with self._lock:
            self.stats.ssd_reads += good
            if result is not None:
                self.stats.ssd_mismatches += int(result.mismatch.sum())
                self.stats.ssd_io_errors += result.io_errors
        return ids[:good]

    # ------------------------------------------------------------------------------------- other

    def clear(self) -> None:
        """Drops every page from the indexes (pages on SSD are forgotten too)."""
        self._cpu.index.reset()
        if self._ssd is not None:
            self._ssd.index.reset()

    def close(self) -> None:
        if self._ssd is not None:
            self._ssd.close()
            self._ssd = None
        self._cpu.close()

    @property
    def ssd_restored(self) -> int:
        return self._ssd.restored if self._ssd is not None else 0

    def index_stats(self) -> dict:
        out = {"cpu": self._cpu.index.stats()}
        if self._ssd is not None:
            out["ssd"] = self._ssd.index.stats()
        return out

    def _parents(self, n: int) -> np.ndarray:
        return np.repeat(self.namespace_key.reshape(1, 2), n, axis=0)

    def _tokens(self, n: int) -> np.ndarray:
        # Pages carry no token ids: the key (a hash over them) identifies the page.
        return np.zeros((n, self.cache_config.tokens_per_block), dtype=np.int64)

    def _check(self, layout: EngineLayout, pages: np.ndarray, n: int) -> None:
        if layout.block_bytes != self.block_bytes:
            raise LayoutError(f"page layout holds {layout.block_bytes} bytes per page, the store {self.block_bytes}")
        if len(pages) != n:
            raise LayoutError(f"{n} keys but {len(pages)} pages")
