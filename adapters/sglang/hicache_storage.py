"""FlexKV as SGLang HiCache's storage backend (the L3 tier behind SGLang's host pool).

``--enable-hierarchical-cache --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
'{"backend_name":"flexkv","module_path":"flexkv.adapters.sglang","class_name":"FlexKVHiCacheStorage",
"interface_v1":1}'`` with ``FLEXKV_CONFIG_PATH`` (or ``"flexkv_config"`` in that JSON) naming FlexKV's config.

SGLang's cache controller calls this backend from its own threads with one key per page (its SHA-256 page
hashes): ``batch_exists`` counts the leading pages held, ``batch_get_v1`` / ``batch_set_v1`` move pages
between SGLang's host pool and FlexKV without an intermediate copy (through the pool's
``get_page_buffer_meta``), and the legacy ``get / set / batch_get / batch_set / exists`` move flat pages.
Pages live in FlexKV's CPU tier and, with ``enable_ssd``, on SSD, where a restart finds them again. Keys
are namespaced by model, host layout and (for MHA) TP/PP/CP rank, so ranks and layouts never share a page.
A failure inside FlexKV is a miss or a page not stored, logged and counted; it never raises into SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

import numpy as np
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from flexkv.core import ConfigError, EngineLayout, PageStore, load_config

from .flexkv_config import block_size_for_page
from .host_layout import host_pool_layout
from .versions import check_sglang_version

logger = logging.getLogger("flexkv")


def storage_namespace(config: HiCacheStorageConfig) -> str:
    """Model and rank part of the page namespace: MLA pages are shared by all TP ranks, MHA pages are not."""
    parts: dict[str, Any] = {"model": config.model_name or ""}
    if not config.is_mla_model:
        parts["tp"] = [config.tp_rank, config.tp_size]
    if config.pp_size > 1:
        parts["pp"] = [config.pp_rank, config.pp_size]
    if getattr(config, "attn_cp_size", 1) > 1:
        parts["cp"] = [config.attn_cp_rank, config.attn_cp_size]
    if getattr(config, "dcp_size", 1) > 1:
        parts["dcp"] = [config.dcp_rank, config.dcp_size]
    return json.dumps(parts, sort_keys=True)


class FlexKVHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        check_sglang_version()
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        if storage_config.is_mla_model and storage_config.tp_size > 1:
            raise ConfigError("FlexKV's HiCache backend serves an MLA model with tp_size=1 only in this version (its "
                              "TP ranks would have to share one store); run with --tp-size 1 or another backend",
                              "tp_size")
        path = extra.get("flexkv_config")
        self.flexkv = load_config(path) if path else load_config()
        self.namespace = storage_namespace(storage_config)
        self.store: PageStore | None = None
        self.layout: EngineLayout | None = None
        self.page_size = 0
        self._lock = threading.Lock()
        self._metrics: dict[str, list] = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [],
                                          "backup_bandwidth": []}
        self.failures = 0

    # -------------------------------------------------------------------------------- registration

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        layout, model, tag = host_pool_layout(mem_pool_host, bool(self.storage_config.is_mla_model))
        page_size = int(mem_pool_host.page_size)
        cache = dataclasses.replace(self.flexkv.cache_config,
                                    tokens_per_block=block_size_for_page(self.flexkv.cache_config.tokens_per_block,
                                                                         page_size))
        store = PageStore(model, cache, namespace=self.namespace, layout_tag=tag)
        with self._lock:
            if self.store is not None:
                self.store.close()
            self.store, self.layout, self.page_size = store, layout, page_size
        logger.info("FlexKV HiCache backend: %s, pages of %d bytes, %d CPU blocks%s", tag, layout.block_bytes,
                    store.cache_config.num_cpu_blocks,
                    f", SSD with {store.ssd_restored} pages restored" if store.cache_config.enable_ssd else "")

    def _ready(self) -> tuple[PageStore, EngineLayout]:
        store, layout = self.store, self.layout
        if store is None or layout is None:
            raise RuntimeError("FlexKV HiCache backend: no host pool registered yet")
        return store, layout

    def _pages(self, host_indices: Any, n: int) -> np.ndarray:
        idx = np.asarray(host_indices.cpu() if hasattr(host_indices, "cpu") else host_indices, dtype=np.int64)
        if len(idx) < n * self.page_size:
            raise ValueError(f"{len(idx)} host indices for {n} pages of {self.page_size} tokens")
        return idx[: n * self.page_size: self.page_size] // self.page_size

    # ------------------------------------------------------------------------------- zero-copy API

    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        try:
            store, _ = self._ready()
            return store.exists(store.keys(keys))
        except Exception:
            self._failed("batch_exists")
            return 0

    def batch_get_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        start = time.perf_counter()
        try:
            store, layout = self._ready()
            got = store.get(store.keys(keys), layout, self._pages(host_indices, len(keys)))
        except Exception:
            self._failed("batch_get_v1")
            got = 0
        self._note("prefetch", got, start)
        return [True] * got + [False] * (len(keys) - got)

    def batch_set_v1(self, keys: list[str], host_indices: Any, extra_info: Any = None) -> list[bool]:
        start = time.perf_counter()
        try:
            store, layout = self._ready()
            stored = store.put(store.keys(keys), layout, self._pages(host_indices, len(keys)),
                               prefix=self._prefix(store, extra_info)).tolist()
        except Exception:
            self._failed("batch_set_v1")
            stored = [False] * len(keys)
        self._note("backup", sum(stored), start)
        return stored

    @staticmethod
    def _prefix(store: PageStore, extra_info: Any) -> np.ndarray | None:
        """The key of the page before a batch (empty: the sequence starts there; None: SGLang did not say)."""
        prefix = getattr(extra_info, "prefix_keys", None)
        if prefix is None:
            return None
        return store.keys(list(prefix[-1:]))

    # ---------------------------------------------------------------------------------- legacy API

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        pages = self.batch_get([key], None if target_location is None else [target_location])
        return pages[0]

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[Any]:
        """Flat pages (``get_data_page(index, flat=True)`` order) for the leading held keys, None after them.
        A given target is filled and returned; otherwise a new tensor is."""
        import torch

        start = time.perf_counter()
        try:
            store, _ = self._ready()
            staging = self._staging(len(keys))
            got = store.get(store.keys(keys), self._staging_layout(staging), np.arange(len(keys), dtype=np.int64))
        except Exception:
            self._failed("batch_get")
            return [None] * len(keys)
        out: list[Any] = []
        for i in range(len(keys)):
            if i >= got:
                out.append(None)
            elif target_locations is not None and target_locations[i] is not None:
                target = target_locations[i]
                target.view(torch.uint8).view(-1).copy_(staging[i].view(torch.uint8))
                out.append(target)
            else:
                out.append(staging[i])
        self._note("prefetch", got, start)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        import torch

        start = time.perf_counter()
        try:
            store, _ = self._ready()
            staging = torch.stack([v.reshape(-1) for v in values]).contiguous()
            stored = store.put(store.keys(keys), self._staging_layout(staging), np.arange(len(keys), dtype=np.int64))
        except Exception:
            self._failed("batch_set")
            return False
        self._note("backup", int(stored.sum()), start)
        return bool(stored.all())

    def _staging(self, n: int) -> Any:
        import torch

        host = self.mem_pool_host
        _, layout = self._ready()
        return torch.empty((n, layout.block_bytes // host.dtype.itemsize), dtype=host.dtype)

    def _staging_layout(self, staging: Any) -> EngineLayout:
        _, layout = self._ready()
        if staging.shape[1] * staging.element_size() != layout.block_bytes:
            raise ValueError(f"flat pages of {staging.shape[1] * staging.element_size()} bytes; the host pool's "
                             f"pages hold {layout.block_bytes}")
        return EngineLayout.from_block_views([staging], "flat pages")

    # ------------------------------------------------------------------------------------- other

    def clear(self) -> None:
        if self.store is not None:
            self.store.clear()

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics (pages and bandwidths since the last call)."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        metrics = StorageMetrics()
        with self._lock:
            for name, values in self._metrics.items():
                getattr(metrics, name).extend(values)
                values.clear()
        return metrics

    def flexkv_stats(self) -> dict[str, Any]:
        """FlexKV's own counters: pages stored, loaded and missed, SSD reads, writes and mismatches."""
        out: dict[str, Any] = {"failures": self.failures}
        if self.store is not None:
            out.update(vars(self.store.stats))
            out["index"] = self.store.index_stats()
            out["metrics"] = self.store.metrics_snapshot()  # latencies, queue depths (flexkv stats' numbers)
        return out

    def close(self) -> None:
        with self._lock:
            store, self.store = self.store, None
        if store is not None:
            store.close()

    def _failed(self, what: str) -> None:
        self.failures += 1
        logger.exception("FlexKV HiCache backend: %s failed; treated as a miss / not stored", what)

    def _note(self, kind: str, pages: int, start: float) -> None:
        if pages <= 0 or not self.layout:
            return
        seconds = max(time.perf_counter() - start, 1e-9)
        with self._lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(pages * self.layout.block_bytes / seconds / 1e9)

