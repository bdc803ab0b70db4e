"""PageStore: FlexKV's cache for pages named by opaque keys, for engines that hash pages themselves (SGLang's
HiCache asks a storage backend whether pages exist, to store them and to load them, a batch at a time, from
its own threads).

A facade over the control plane (``core/control_plane.py``): a page is a block whose key is the engine's
page hash salted by the namespace (the same salting as every engine hash), found wherever it is in the
index. Pages stored with their prefix (``parent``, the page before them) continue it as a chain, so
eviction keeps prefixes whole and blocks stored by the token-keyed facades are the same blocks when the
keys are (``token_keys``). Puts copy into the CPU tier and return; the SSD write-through runs in the
background. Gets take leading pages from the CPU tier and bring SSD-only pages up first. A page that
does not verify on SSD is a miss, counted, and its slot dropped.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexkv import _core

from .config import CacheConfig, ModelConfig
from .control_plane import checked_config, open_control_plane, shutdown_plane
from .errors import LayoutError
from .layout import EngineLayout

logger = logging.getLogger("flexkv")
_WAIT_S = 600.0  # a batch's copy is bounded by memory bandwidth; this only guards against a stuck engine
_LAYOUTS_KEPT = 4


@dataclass
class PageStoreStats:
    """The control plane's counters in pages (a shared plane counts every facade's blocks)."""

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


def page_hashes(names: Sequence[str]) -> np.ndarray:
    """(n, 2) uint64: the first 128 bits of hex digests of at least 32 digits (SGLang's SHA-256 page hashes)."""
    if len(names) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    try:
        raw = bytes.fromhex("".join(str(n)[:32] for n in names))
    except ValueError as e:
        raise ValueError(f"page keys must be hex digests of at least 32 digits: {e}") from None
    if len(raw) != 16 * len(names):
        raise ValueError("page keys must be hex digests of at least 32 digits (128 bits)")
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2).copy()


class PageStore:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, *, namespace: str, layout_tag: str,
                 num_copy_threads: int = 2, ssd_io_engine: str = "auto", ssd_env: Any = None,
                 control_plane: Any = None) -> None:
        self.model_config = model_config
        if isinstance(cache_config, CacheConfig) and cache_config.enable_remote:
            # its pages are not written through to, nor promoted from, the remote tier yet
            logger.warning("FlexKV PageStore: the remote tier (enable_remote) is not used by the page store yet; "
                           "it runs with the CPU and SSD tiers")
            cache_config = dataclasses.replace(cache_config, enable_remote=False)
        self.cache_config = checked_config(model_config, cache_config)
        self.block_bytes = model_config.block_bytes(self.cache_config.tokens_per_block)
        self._owns = control_plane is None
        self._cp = control_plane if control_plane is not None else open_control_plane(
            model_config, self.cache_config, num_copy_threads=num_copy_threads, ssd_io_engine=ssd_io_engine,
            ssd_env=ssd_env)
        if self._cp.block_bytes != self.block_bytes:
            raise LayoutError(f"the shared control plane holds blocks of {self._cp.block_bytes} bytes, this store's "
                              f"pages are {self.block_bytes}; share a plane only between facades of one model")
        self.seed = self._cp.seed(layout_tag, [namespace] if namespace else [])
        self._tpb = self.cache_config.tokens_per_block
        self._layouts: OrderedDict[int, tuple[EngineLayout, int]] = OrderedDict()

    @property
    def control_plane(self) -> Any:
        return self._cp

    # ---------------------------------------------------------------------------------- keys

    def keys(self, names: Sequence[str]) -> np.ndarray:
        """The block keys of hex page hashes in this store's namespace."""
        return _core.salt_block_hashes(self.seed, page_hashes(names))

    def token_keys(self, token_ids: Any) -> np.ndarray:
        """The block keys the token-keyed facades give the whole blocks of ``token_ids`` in this namespace."""
        return self._cp.token_run(self.seed, np.ascontiguousarray(token_ids, dtype=np.int64)).keys

    # ----------------------------------------------------------------------------- batches

    def exists(self, keys: np.ndarray) -> int:
        """How many leading keys the store holds (in the CPU tier or on SSD)."""
        cpu, ssd = self._cp.lookup(self._cp.entry_run(self.seed, keys))
        return int(max(cpu, ssd))

    def put(self, keys: np.ndarray, layout: EngineLayout, pages: np.ndarray, prefix: np.ndarray | None = None,
            ) -> np.ndarray:
        """Copies page ``pages[i]`` of ``layout`` in under ``keys[i]``; returns per page whether the store holds
        it now. ``prefix`` holds the keys of the pages before ``keys[0]`` (its last one is enough; empty: a
        sequence starts at keys[0]); without it each page is stored on its own."""
        self._check(layout, pages, len(keys))
        if prefix is None:
            run = self._cp.entry_run(self.seed, keys)
        else:
            run = self._cp.page_run(self.seed, keys, prefix[-1] if len(prefix) else None)
        task, blocks, covered = self._cp.put_match(run, 0, len(keys) * self._tpb)
        self._copy(task, layout, pages, blocks)
        stored = np.zeros(len(keys), dtype=bool)
        stored[:covered] = True
        return stored

    def get(self, keys: np.ndarray, layout: EngineLayout, pages: np.ndarray) -> int:
        """Copies the leading held pages into ``pages[i]`` of ``layout``; returns how many it copied."""
        self._check(layout, pages, len(keys))
        task, blocks, _ = self._cp.get_match(self._cp.entry_run(self.seed, keys), 0, len(keys) * self._tpb)
        return len(self._copy(task, layout, pages, blocks))

    def _copy(self, task: int, layout: EngineLayout, pages: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """Launches a matched task on `layout` and waits for it; returns the run positions it moved."""
        if len(blocks):
            targets = np.ascontiguousarray(np.asarray(pages, dtype=np.int64)[blocks])
            self._cp.launch([task], [targets], False, self._handle(layout))
        ((_, status, _, moved, error),) = self._cp.wait([task], _WAIT_S)
        if status == _core.ReportStatus.TIMEOUT:
            raise TimeoutError(f"FlexKV page store: a batch of {len(blocks)} pages did not finish in {_WAIT_S} s")
        return moved

    # ------------------------------------------------------------------------------- other

    def flush(self, timeout: float = 60.0) -> bool:
        """Waits until the pages stored so far are on SSD too (no write-through pending); False on timeout."""
        return bool(self._cp.flush(float(timeout)))

    def clear(self) -> None:
        """Drops every page from the indexes (pages on SSD are forgotten too)."""
        self._cp.reset()

    def close(self) -> None:
        layouts, self._layouts = self._layouts, OrderedDict()
        if self._owns:
            shutdown_plane(self._cp)
            return
        for _, handle in layouts.values():
            self._cp.unregister_layout(handle)

    @property
    def ssd_restored(self) -> int:
        return int(self._cp.ssd_restored)

    def metrics_snapshot(self) -> dict[str, Any]:
        """The control plane's counters, latency histograms, queue depths and indexes (core/metrics.py)."""
        from .metrics import plane_snapshot

        return plane_snapshot(self._cp)

    def index_stats(self) -> dict:
        return dict(self._cp.index_counts())

    @property
    def stats(self) -> PageStoreStats:
        c = self._cp.counters()
        return PageStoreStats(
            exists_queries=c["lookup_requests"], exists_hits=c["lookup_hit_blocks"], pages_stored=c["put_new_blocks"],
            pages_already_held=c["put_cached_blocks"], pages_not_stored=c["put_dropped_blocks"],
            pages_loaded=c["get_loaded_blocks"], pages_missed=c["get_query_blocks"] - c["get_loaded_blocks"],
            ssd_writes=c["ssd_written_blocks"], ssd_reads=c["ssd_hit_blocks"], ssd_mismatches=c["ssd_mismatch_blocks"],
            ssd_io_errors=c["ssd_read_errors"] + c["ssd_write_errors"])

    def _handle(self, layout: EngineLayout) -> int:
        """The control plane's handle of a page layout, registered once and kept for the last few layouts."""
        entry = self._layouts.get(id(layout))
        if entry is not None and entry[0] is layout:
            self._layouts.move_to_end(id(layout))
            return entry[1]
        handle = self._cp.register_layout(layout.grouped_segments(), layout.num_blocks,
                                          layout.cuda_index if layout.is_cuda else -1)
        self._layouts[id(layout)] = (layout, handle)
        while len(self._layouts) > _LAYOUTS_KEPT:
            _, (_, old) = self._layouts.popitem(last=False)
            self._cp.unregister_layout(old)
        return handle

    def _check(self, layout: EngineLayout, pages: np.ndarray, n: int) -> None:
        if layout.block_bytes != self.block_bytes:
            raise LayoutError(f"page layout holds {layout.block_bytes} bytes per page, the store {self.block_bytes}")
        if len(pages) != n:
            raise LayoutError(f"{n} keys but {len(pages)} pages")
