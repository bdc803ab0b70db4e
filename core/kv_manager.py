"""KVManager: FlexKV's task API over the CPU and SSD tiers, in the engine's own process.

Flow of a get: ``get_match`` hashes the token blocks, locks the leading cached
blocks and returns a mask of the tokens it can load; blocks found only on SSD
start moving up to the CPU right away. ``launch`` takes the engine slots of
those tokens and starts the copy into the engine (after the promotion, if one
runs); ``wait`` / ``try_wait`` report the end. A put is the same with
``put_match``: the mask marks the tokens whose blocks are new to the cache; once
they are in the CPU tier they are written through to SSD in the background.
Every task ends, on every path, with its blocks unlocked: a get unlocks what it
read, a put marks what it wrote ready (or, if it failed, leaves it unreadable
until it is rewritten or evicted).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexkv import _core

from .config import CacheConfig, ModelConfig, canonical_dtype_name
from .cpu_tier import CpuTier
from .errors import ConfigError, FlexKVError, LayoutError, TaskError
from .external_copy import ExternalCopy
from .gpu_plane import make_gpu_copy_engine
from .layout import EngineLayout, KVCacheLayout
from .local_registry import register_manager, unregister_manager
from .request import KVResponse, KVResponseStatus
from .resources import require_resources
from .ssd_flow import SsdFlow
from .ssd_tier import IO_ALIGN, SsdTier
from .task import Task, TaskState, TaskType
from .tiering import Chain, TierCounters, abandon_promotion, plan_promotion

logger = logging.getLogger("flexkv")

_MAX_FINISHED_TASKS = 100_000
_MAX_BLOCKS = 2**31 - 1  # block ids are int32
_EMPTY_IDS = np.zeros(0, dtype=np.int32)
_LIVE: weakref.WeakSet[KVManager] = weakref.WeakSet()  # started managers


@atexit.register
def _shut_down_live_managers() -> None:
    """Engines rarely call shutdown(): copies in flight finish and the tiers are freed before the process ends."""
    for manager in list(_LIVE):
        try:
            manager.shutdown()
        except Exception:  # exiting anyway: a failure here must not hide the process's own exit status
            logger.exception("FlexKV: shutdown at exit failed")


@dataclass
class KVManagerStats(TierCounters):
    get_requests: int = 0
    get_query_tokens: int = 0   # tokens of whole blocks asked for by get_match
    get_hit_tokens: int = 0     # of those, tokens found in the cache
    put_requests: int = 0
    put_new_tokens: int = 0     # tokens whose blocks a put stores
    put_cached_tokens: int = 0  # tokens a put skipped because they were cached or being stored
    put_dropped_tokens: int = 0  # tokens a put could not store: no block could be freed for them
    put_no_prefix_tokens: int = 0  # tokens a put could not store: the blocks before its mask are not cached
    tasks_failed: int = 0
    tasks_cancelled: int = 0

    @property
    def hit_rate(self) -> float:
        return self.get_hit_tokens / self.get_query_tokens if self.get_query_tokens else 0.0


class KVManager(SsdFlow, ExternalCopy):
    """FlexKV's KV cache manager (``flexkv.KVManager``, also ``flexkv.kvmanager.KVManager``).

    ``layout_tag`` names the engine's byte order inside a block; engines whose
    blocks are laid out differently must use different tags so they never share
    blocks. ``namespace`` is a salt shared by all of this manager's requests.
    ``server_recv_port``, ``gpu_register_port`` and ``event_collector`` are
    accepted for FlexKV compatibility; the in-process manager does not use them.
    """

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dp_client_id: int = 0,
                 server_recv_port: str = "", gpu_register_port: str = "", event_collector: Any = None, *,
                 namespace: str = "", layout_tag: str = "", num_copy_threads: int = 2, ssd_io_engine: str = "auto",
                 ssd_fault_injection: bool = False) -> None:
        if not isinstance(model_config, ModelConfig):
            raise TypeError(f"model_config must be a flexkv ModelConfig, got {type(model_config).__name__}")
        if not isinstance(cache_config, CacheConfig):
            raise TypeError(f"cache_config must be a flexkv CacheConfig, got {type(cache_config).__name__}")
        model_config.validate()
        cache_config.validate()
        resolved = cache_config.resolved(model_config)
        if model_config.dp_size != 1 or dp_client_id != 0:
            raise FlexKVError("dp_size > 1 needs FlexKV's server mode (`flexkv serve`), which this version does "
                              "not have; run one KVManager per data-parallel rank with dp_size=1")
        if resolved.enable_remote:
            raise FlexKVError("cache_config.enable_remote: this version has no remote tier yet; set enable_remote "
                              "to false to run with the CPU tier")
        if resolved.num_cpu_blocks > _MAX_BLOCKS:
            raise ConfigError(f"cache_config.num_cpu_blocks = {resolved.num_cpu_blocks} exceeds {_MAX_BLOCKS}, the "
                              "most one tier can index; use larger blocks (tokens_per_block) or fewer of them",
                              "cache_config.num_cpu_blocks")
        if isinstance(num_copy_threads, bool) or not isinstance(num_copy_threads, int) or num_copy_threads < 1:
            raise TaskError(f"num_copy_threads must be a positive int, got {num_copy_threads!r}")
        self.model_config = model_config
        self.cache_config = resolved
        self.tokens_per_block = self.cache_config.tokens_per_block
        self.block_bytes = model_config.block_bytes(self.tokens_per_block)
        self.server_recv_port = server_recv_port
        self.gpu_register_port = gpu_register_port
        self.event_collector = event_collector
        self.num_copy_threads = num_copy_threads
        self.ssd_io_engine = ssd_io_engine
        self.ssd_fault_injection = ssd_fault_injection
        # The SSD files are shared by every manager of the same model, layout and block size.
        self.ssd_fingerprint = json.dumps(["flexkv-ssd-v1", model_config.fingerprint(), self.tokens_per_block,
                                           layout_tag, self.block_bytes])
        # Namespace parts are JSON-encoded, so no choice of salt strings can make two namespaces equal.
        self._base_namespace = ["flexkv-v1", model_config.fingerprint(), self.tokens_per_block, layout_tag,
                                namespace]
        self._seeds: dict[tuple[str, ...], np.ndarray] = {}
        self._cond = threading.Condition()
        self._tasks: OrderedDict[int, Task] = OrderedDict()
        self._running: dict[int, Task] = {}  # copy job id -> task
        self._next_task_id = 1
        self._tier: CpuTier | None = None
        self._ssd: SsdTier | None = None
        self._ssd_reads: ThreadPoolExecutor | None = None   # promotions: a get waits for them
        self._ssd_writes: ThreadPoolExecutor | None = None  # write-through: nobody waits
        self._promoting = 0  # promotions in flight
        self._write_backlog = 0  # CPU blocks locked until their write-through
        self._write_backlog_limit = max(1, self.cache_config.num_cpu_blocks // 4)
        self._copy: Any = None
        self._engine: EngineLayout | None = None
        self._layout_id: int | None = None  # the registered layout's id in the copy engine
        self._completer: threading.Thread | None = None
        self._closing = False   # shutdown() has begun: no launch may start
        self._launching = 0     # launch() calls between claiming tasks and queuing their copies
        self.stats = KVManagerStats()
        self._launch_listeners: list[Callable[[list[int], bool, int], None]] = []

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Allocates the CPU tier and starts the copy threads. Idempotent."""
        if self._tier is not None:
            return
        require_resources(self.cache_config, self.model_config)
        if self.gpu_register_port:  # first: a port in use refuses the start before anything is allocated
            register_manager(self.gpu_register_port, self)
        ssd = tier = None
        try:
            if self.cache_config.enable_ssd:
                ssd = SsdTier(self.cache_config, self.block_bytes, self.ssd_fingerprint,
                              io_engine=self.ssd_io_engine, fault_injection=self.ssd_fault_injection)
            tier = CpuTier(self.cache_config.num_cpu_blocks, self.block_bytes, self.cache_config.evict_ratio,
                           self.cache_config.use_hugepage_cpu_buffer, block_align=IO_ALIGN if ssd else 1)
            copy, layout_id = self._copy_engine_for(self._engine, tier)
        except BaseException:
            for part in (ssd, tier):
                if part is not None:
                    part.close()
            if self.gpu_register_port:
                unregister_manager(self.gpu_register_port, self)
            raise
        if ssd is not None:
            self._ssd_reads = ThreadPoolExecutor(1, thread_name_prefix="flexkv-ssd-read")
            self._ssd_writes = ThreadPoolExecutor(1, thread_name_prefix="flexkv-ssd-write")
        self._copy, self._layout_id, self._tier, self._ssd, self._closing = copy, layout_id, tier, ssd, False
        self._completer = threading.Thread(target=self._complete_loop, name="flexkv-completer", daemon=True)
        self._completer.start()
        _LIVE.add(self)
        logger.info("FlexKV CPU tier: %d blocks x %d bytes in %s", self.cache_config.num_cpu_blocks,
                    self.block_bytes, tier.shm_name)

    def is_ready(self) -> bool:
        """True once started and the engine's KV memory is registered."""
        return self._tier is not None and self._engine is not None

    def shutdown(self) -> None:
        """Refuses new launches, cancels tasks not yet launched, waits for copies in flight, frees the CPU tier."""
        with self._cond:
            if self._tier is None or self._closing:
                return
            self._closing = True
            while self._launching:
                self._cond.wait()
            unlaunched = [t.id for t in self._tasks.values() if t.state is TaskState.UNREADY]
        self.cancel(unlaunched)
        assert self._completer is not None
        self._completer.join()  # returns once every promotion and running copy has completed
        self._completer = None
        for pool in (self._ssd_reads, self._ssd_writes):
            if pool is not None:
                pool.shutdown(wait=True)  # write-throughs finish before the CPU tier goes
        self._ssd_reads = self._ssd_writes = None
        if self._ssd is not None:
            self._ssd.close()
        self._ssd = None
        self._copy = None  # a GPU engine unregisters the CPU tier's memory before the tier unmaps it
        self._tier.close()
        self._tier = None
        self._engine = None
        if self.gpu_register_port:
            unregister_manager(self.gpu_register_port, self)
        _LIVE.discard(self)

    def __enter__(self) -> KVManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def register_kv_caches(self, kv_caches: Any, kv_layout: KVCacheLayout | None = None) -> None:
        """Registers the engine's KV memory.

        ``kv_caches`` is a list of per-layer tensors or one tensor described by
        ``kv_layout``, or an ``EngineLayout`` (``kv_layout`` then None) for layouts
        that ``KVCacheLayoutType`` cannot express.
        """
        if isinstance(kv_caches, EngineLayout):
            if kv_layout is not None:
                raise LayoutError("register_kv_caches: give either an EngineLayout or tensors with a kv_layout")
            layout = kv_caches
        elif isinstance(kv_layout, KVCacheLayout):
            if kv_layout.tokens_per_block != self.tokens_per_block:
                raise LayoutError(f"kv_layout.tokens_per_block is {kv_layout.tokens_per_block} but "
                                  f"cache_config.tokens_per_block is {self.tokens_per_block}; they must be equal")
            if kv_layout.num_layer != self.model_config.num_layers or kv_layout.is_mla != self.model_config.use_mla:
                raise LayoutError(f"kv_layout ({kv_layout.num_layer} layers, mla={kv_layout.is_mla}) does not match "
                                  f"model_config ({self.model_config.num_layers} layers, "
                                  f"use_mla={self.model_config.use_mla})")
            layout = EngineLayout.from_kv_layout(kv_caches, kv_layout)
            for i, t in enumerate(kv_caches if isinstance(kv_caches, (list, tuple)) else [kv_caches]):
                got = canonical_dtype_name(t.dtype, f"kv_caches[{i}].dtype")
                if got != self.model_config.dtype_name:
                    raise LayoutError(f"kv_caches[{i}] has dtype {got}, model_config.dtype is "
                                      f"{self.model_config.dtype_name}; register the tensors the model writes")
        else:
            raise LayoutError("register_kv_caches: kv_layout must be a flexkv KVCacheLayout "
                              f"(got {type(kv_layout).__name__}); or pass an EngineLayout as kv_caches")
        if self.model_config.tp_size != 1:
            raise LayoutError("model_config.tp_size > 1: registering one rank's slice needs the multi-worker data "
                              "plane, which this version does not have; use tp_size=1")
        if layout.block_bytes != self.block_bytes:
            raise LayoutError(f"the registered KV memory holds {layout.block_bytes} bytes per block, but model_config "
                              f"and tokens_per_block={self.tokens_per_block} give {self.block_bytes}; check "
                              "num_layers, num_kv_heads, head_size, dtype and use_mla")
        layout.validate()
        with self._cond:
            if self._running or self._promoting or self._launching:
                raise TaskError("register_kv_caches: copies are in flight; wait for the tasks to end first")
            if self._tier is not None and not self._closing:
                self._copy, self._layout_id = self._replace_copy_engine(layout, self._tier)
            self._engine = layout

    def _replace_copy_engine(self, layout: EngineLayout, tier: CpuTier) -> tuple[Any, int]:
        """The copy engine for a newly registered layout, and the layout's id in it. A GPU engine in use hands
        the CPU tier's pinning over first: the tier stays pinned only as long as the engine that pinned it lives."""
        old = self._copy
        gpu = old is not None and not isinstance(old, _core.HostCopyEngine)
        if gpu:
            old.unregister_host(tier.base)
        try:
            return self._copy_engine_for(layout, tier)
        except BaseException:
            if gpu:
                old.register_host(tier.base, tier.num_blocks * tier.block_stride)
            raise

    def _copy_engine_for(self, layout: EngineLayout | None, tier: CpuTier) -> tuple[Any, int | None]:
        """A GPU copy engine for KV memory on a CUDA device, the host copy threads otherwise; with the layout
        registered in it (its id, or None without a layout)."""
        if layout is not None and layout.is_cuda:
            return make_gpu_copy_engine(self.cache_config, layout, tier)
        reused = isinstance(self._copy, _core.HostCopyEngine)
        copy = self._copy if reused else _core.HostCopyEngine(self.num_copy_threads)
        if layout is None:
            return copy, None
        copy.register_host(tier.base, tier.num_blocks * tier.block_stride)
        layout_id = copy.register_layout(layout.segments, layout.num_blocks, tier.base, tier.block_stride,
                                         tier.num_blocks)
        if reused and self._layout_id is not None:
            copy.unregister_layout(self._layout_id)
        return copy, layout_id

    # -------------------------------------------------------------------- match

    def get_match(self, token_ids: Any, token_mask: Any = None, namespace: Sequence[str] | str | None = None,
                  ) -> tuple[int, np.ndarray]:
        """Locks the cached blocks that the masked tokens need; returns (task_id, mask of loadable tokens).

        ``token_mask`` is False for tokens the engine already has (a prefix) and True for the rest.
        The mask returned is True for the tokens of the whole cached blocks the get will load.
        """
        tokens, _, first = self._check_tokens(token_ids, token_mask)
        tier = self._require_started()
        chain = self._chain(tokens, namespace)
        keys = chain.keys
        n_cpu, load = tier.index.acquire(keys, min(first, len(keys)))
        promotion = None
        if self._ssd is not None and n_cpu < len(keys):
            promotion = plan_promotion(tier, self._ssd, chain, n_cpu)
            if promotion is not None and promotion.stop <= first:  # only blocks the engine already has
                abandon_promotion(tier, self._ssd, promotion)
                promotion = None
        held = load
        end = max(first, n_cpu)
        if promotion is not None:
            held = np.concatenate([load, promotion.cpu_ids])
            end = max(first, promotion.stop)
        host_ids = held[len(held) - (end - first):] if end > first else _EMPTY_IDS
        task = self._new_task(TaskType.GET, len(tokens), np.arange(first, end, dtype=np.int64), host_ids,
                              held=held, chain=chain, promotion=promotion)
        tpb = self.tokens_per_block
        with self._cond:
            self.stats.get_requests += 1
            self.stats.get_query_tokens += max(0, len(keys) - first) * tpb
            self.stats.get_hit_tokens += (end - first) * tpb
        mask = task.token_mask()  # what is promised: before a fast promotion can trim the task
        if promotion is not None:
            self._start_promotion(task)
        return task.id, mask

    def put_match(self, token_ids: Any, token_mask: Any = None, namespace: Sequence[str] | str | None = None,
                  ) -> tuple[int, np.ndarray]:
        """Reserves CPU blocks for the masked tokens' blocks that are not cached yet.

        Returns (task_id, mask of the tokens to store). The blocks before the mask must already be cached
        (they are the prefix the new blocks hang off); if they are not, the put stores nothing.
        """
        tokens, _, first = self._check_tokens(token_ids, token_mask)
        tier = self._require_started()
        chain = self._chain(tokens, namespace)
        keys = chain.keys
        if first >= len(keys):
            ids, is_new = _EMPTY_IDS, np.zeros(0, dtype=bool)
        else:
            ids, is_new = tier.index.reserve(keys, first)
        new_blocks = np.flatnonzero(is_new).astype(np.int64)
        task = self._new_task(TaskType.PUT, len(tokens), new_blocks, ids[new_blocks], chain=chain)
        tpb = self.tokens_per_block
        asked = max(0, len(keys) - first)
        with self._cond:
            self.stats.put_requests += 1
            self.stats.put_new_tokens += len(new_blocks) * tpb
            if len(ids) < first:
                self.stats.put_no_prefix_tokens += asked * tpb
            else:
                self.stats.put_cached_tokens += (len(ids) - first - len(new_blocks)) * tpb
                self.stats.put_dropped_tokens += (len(keys) - len(ids)) * tpb
        return task.id, task.token_mask()

    # ------------------------------------------------------------------- launch

    def launch(self, task_ids: int | Sequence[int], slot_mappings: Any, as_batch: bool = False,
               layerwise_transfer: bool = False, counter_id: int = 0) -> list[int]:
        """Starts the copies of matched tasks. ``slot_mappings[i]`` holds the engine slots
        (``block_id * tokens_per_block + offset``) of the tokens that task i's mask marks.

        ``as_batch`` and ``counter_id`` are accepted for the engines that pass them: the tasks of one call
        are always launched together, and listeners (``add_launch_listener``) hear the counter id.

        The call is all or nothing, and a TaskError names the culprit: if an id is unknown or was launched
        before, nothing is launched and the other tasks stay as they were (launch or cancel them); if a
        slot mapping is bad, no copy starts and every task of the call ends FAILED with its blocks unlocked.
        """
        ids = _task_ids(task_ids, unique=False)
        if isinstance(slot_mappings, np.ndarray) or _is_tensor(slot_mappings):
            slot_mappings = [slot_mappings]
        if not isinstance(slot_mappings, (list, tuple)):
            raise TaskError("launch: slot_mappings must be an array of engine slots or a list of them, one per "
                            f"task; got {type(slot_mappings).__name__}")
        if len(slot_mappings) != len(ids):
            raise TaskError(f"launch: {len(ids)} task ids but {len(slot_mappings)} slot mappings")
        tasks = self._claim_for_launch(ids)
        for task in tasks:
            task.layerwise = bool(layerwise_transfer)
        try:
            try:
                engine = self._engine
                plans = [self._engine_blocks(slots, task, engine) for task, slots in zip(tasks, slot_mappings)]
            except TaskError as e:
                for task in tasks:
                    if task.state is not TaskState.RUNNING:
                        continue
                    with self._cond:
                        if task.promotion is not None:  # its SSD reads still write into its CPU blocks
                            task.end_requested = (TaskState.FAILED, f"launch failed: {e}")
                            continue
                    self._finish(task, TaskState.FAILED, f"launch failed: {e}")
                raise
            self._submit(tasks, plans)
        finally:
            with self._cond:
                self._launching -= 1
                self._cond.notify_all()
        for listener in list(self._launch_listeners):
            try:
                listener(ids, bool(layerwise_transfer), int(counter_id))
            except Exception:  # a listener's failure is its own; the copies are already queued
                logger.exception("FlexKV: a launch listener failed")
        return ids

    def add_launch_listener(self, listener: Callable[[list[int], bool, int], None]) -> None:
        """Calls ``listener(task_ids, layerwise_transfer, counter_id)`` after every successful launch, on the
        launching thread (an engine's per-layer signalling hooks in here)."""
        self._launch_listeners.append(listener)

    def get_async(self, token_ids: Any, slot_mapping: Any, token_mask: Any = None,
                  namespace: Sequence[str] | str | None = None) -> int:
        """get_match + launch. ``slot_mapping`` holds the slots of the tokens ``token_mask`` marks."""
        return self._match_and_launch(self.get_match, token_ids, slot_mapping, token_mask, namespace)

    def put_async(self, token_ids: Any, slot_mapping: Any, token_mask: Any = None,
                  namespace: Sequence[str] | str | None = None) -> int:
        """put_match + launch. ``slot_mapping`` holds the slots of the tokens ``token_mask`` marks."""
        return self._match_and_launch(self.put_match, token_ids, slot_mapping, token_mask, namespace)

    def lookup(self, token_ids: Any, namespace: Sequence[str] | str | None = None) -> tuple[int, int]:
        """(tokens of the leading whole blocks the CPU tier holds ready, the same for the SSD tier), without
        locking or moving anything: an answer for a scheduler's "how much could I load" that a later
        get_match may find smaller (blocks can be evicted in between)."""
        tokens, _, _ = self._check_tokens(token_ids, None)
        tier = self._require_started()
        keys = self._chain(tokens, namespace).keys
        n_cpu = tier.index.match(keys)
        n_ssd = self._ssd.index.match(keys) if self._ssd is not None else 0
        return n_cpu * self.tokens_per_block, n_ssd * self.tokens_per_block

    def prefetch_async(self, token_ids: Any, namespace: Sequence[str] | str | None = None) -> int:
        """Promotes the blocks of token_ids that only slower tiers hold into the CPU tier, so a later get
        finds them there. The task needs no launch; it completes when the blocks are in the CPU tier
        (at once when there is nothing to promote)."""
        tokens, _, _ = self._check_tokens(token_ids, None)
        tier = self._require_started()
        chain = self._chain(tokens, namespace)
        promotion = None
        if self._ssd is not None:
            n_cpu = tier.index.match(chain.keys)
            if n_cpu < len(chain.keys):
                promotion = plan_promotion(tier, self._ssd, chain, n_cpu)
        held = promotion.cpu_ids if promotion is not None else _EMPTY_IDS
        task = self._new_task(TaskType.PREFETCH, len(tokens), np.zeros(0, dtype=np.int64), _EMPTY_IDS, held=held,
                              chain=chain, promotion=promotion)
        if promotion is not None:
            with self._cond:
                task.state = TaskState.RUNNING
                task.launched = time.monotonic()
            self._start_promotion(task)
        return task.id

    # --------------------------------------------------------------------- wait

    def wait(self, task_ids: int | Iterable[int], timeout: float = 20.0, completely: bool = False,
             ) -> dict[int, KVResponse]:
        """Waits up to ``timeout`` seconds for the tasks to end. A task that ended is reported once and
        forgotten; an unknown id is NOTFOUND, a matched but unlaunched task UNREADY, one still running TIMEOUT.
        With ``completely``, a put also waits for its write-through to SSD."""
        ids = _task_ids(task_ids)
        deadline = time.monotonic() + max(0.0, float(timeout))

        def busy(t: Task) -> bool:
            return t.state is TaskState.RUNNING or (completely and t.background > 0)

        with self._cond:
            while True:
                pending = [i for i in ids if i in self._tasks and busy(self._tasks[i])]
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                self._cond.wait(left)
            return {i: self._report(i) for i in ids}

    def wait_layer(self, task_id: int, layer: int, stream: Any = None, timeout: float = 20.0) -> bool:
        """Waits until ``layer`` of a launched get is in the engine's KV memory; with ``stream`` (a
        ``torch.cuda.Stream`` or a ``cudaStream_t`` as int) makes that stream wait for it instead, without
        blocking. Returns False if the task ended without completing or ``timeout`` seconds passed first.

        Layers arrive one by one for a task launched with ``layerwise_transfer=True`` on the GPU data plane;
        otherwise every layer arrives with the whole copy. The task's outcome is still reported by wait().
        """
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or \
                not 0 <= int(layer) < self.model_config.num_layers:
            raise TaskError(f"wait_layer: layer must be an int in [0, {self.model_config.num_layers}), got {layer!r}")
        handle = None if stream is None else _stream_handle(stream)
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._cond:
            while True:
                task = self._tasks.get(task_id)
                if task is None:
                    raise TaskError(f"wait_layer: unknown task id {task_id} (or already reported by wait)")
                if task.state is TaskState.UNREADY:
                    raise TaskError(f"wait_layer: task {task_id} is not launched; launch it first")
                if task.state.final:
                    return task.state is TaskState.COMPLETED
                engine, copy, job = self._engine, self._copy, task.job_id
                if job and engine is not None and engine.is_cuda:
                    break  # the copy is queued: its layer events exist
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        if handle is not None:
            copy.stream_wait_group(job, int(layer), handle)
        else:
            copy.wait_group(job, int(layer))
        return True

    def try_wait(self, task_ids: int | Iterable[int]) -> dict[int, KVResponse]:
        """Like wait(timeout=0) but leaves out tasks that are still running."""
        ids = _task_ids(task_ids)
        with self._cond:
            return {i: self._report(i) for i in ids
                    if not (i in self._tasks and self._tasks[i].state is TaskState.RUNNING)}

    def cancel(self, task_ids: int | Iterable[int]) -> None:
        """Cancels tasks not yet launched and unlocks their blocks. Running tasks finish normally."""
        for i in _task_ids(task_ids):
            with self._cond:
                task = self._tasks.get(i)
                if task is None or task.state is not TaskState.UNREADY:
                    if task is not None and task.state is TaskState.RUNNING:
                        logger.warning("cancel: task %d is already copying; it will complete", i)
                    continue
                task.state = TaskState.RUNNING  # claimed: no launch can take it now
                if task.promotion is not None:
                    task.end_requested = (TaskState.CANCELLED, None)  # ended once its SSD reads are done
                    continue
            self._finish(task, TaskState.CANCELLED, None)

    def reset(self) -> None:
        """Drops every cached block from the indexes. Fails while any task holds blocks or a write-through
        runs. Blocks on SSD stay on disk: a restart finds them again."""
        tier = self._require_started()
        with self._cond:
            busy = [t.id for t in self._tasks.values()
                    if t.state in (TaskState.UNREADY, TaskState.RUNNING) or t.background]
            if busy:
                raise TaskError(f"reset: tasks {busy[:8]} are unfinished; wait for or cancel them first")
            try:
                tier.index.reset()
                if self._ssd is not None:
                    self._ssd.index.reset()
            except RuntimeError as e:  # a match on another thread locked blocks just now
                raise TaskError(f"reset: {e}; wait for or cancel the tasks holding them first") from e

    def cache_stats(self) -> dict[str, Any]:
        """Counters of this manager and of its CPU index."""
        tier = self._require_started()
        with self._cond:
            out = dict(vars(self.stats))
        out["hit_rate"] = self.stats.hit_rate
        out["cpu"] = tier.index.stats()
        return out

    # ---------------------------------------------------------------- internals

    def _require_started(self) -> CpuTier:
        tier = self._tier
        if tier is None or self._closing:
            raise TaskError("KVManager is not started (or is shutting down); call start() first")
        return tier

    def _check_tokens(self, token_ids: Any, token_mask: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Validates a request; returns (int64 tokens, bool mask or None for all, index of the first block asked
        for). A block partly asked for counts as asked; with nothing asked, the index is past the last block."""
        tokens = _as_array(token_ids, "token_ids")
        if tokens.ndim != 1:
            raise TaskError(f"token_ids must be 1-D, got shape {tokens.shape}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TaskError(f"token_ids must be integers, got dtype {tokens.dtype}")
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if token_mask is None:
            return tokens, None, 0
        mask = _as_array(token_mask, "token_mask")
        if mask.dtype != np.bool_:
            raise TaskError(f"token_mask must be a bool array, got dtype {mask.dtype}")
        if mask.shape != tokens.shape:
            raise TaskError(f"token_mask has shape {mask.shape}, token_ids {tokens.shape}; they must match")
        start = int(np.argmax(mask)) if len(mask) else 0
        if len(mask) == 0 or not mask[start]:
            return tokens, mask, len(tokens) // self.tokens_per_block + 1
        if not mask[start:].all():
            raise TaskError("token_mask must be False for a prefix of tokens and True for the rest")
        return tokens, mask, start // self.tokens_per_block

    def _keys(self, tokens: np.ndarray, namespace: Sequence[str] | str | None) -> np.ndarray:
        return self._chain(tokens, namespace).keys

    def _chain(self, tokens: np.ndarray, namespace: Sequence[str] | str | None) -> Chain:
        if namespace is None:
            ns: tuple[str, ...] = ()
        elif isinstance(namespace, str):
            ns = (namespace,)
        else:
            ns = tuple(str(n) for n in namespace)
        seed = self._seeds.get(ns)
        if seed is None:
            seed = _core.namespace_key(json.dumps([*self._base_namespace, *ns]))
            self._seeds[ns] = seed
        return Chain(seed, _core.chain_block_keys(seed, tokens, self.tokens_per_block), tokens,
                     self.tokens_per_block)

    def _new_task(self, kind: TaskType, seq_len: int, copy_blocks: np.ndarray, host_ids: np.ndarray, *,
                  held: np.ndarray | None = None, chain: Chain | None = None, promotion: Any = None) -> Task:
        with self._cond:
            task = Task(self._next_task_id, kind, seq_len, copy_blocks, host_ids,
                        host_ids if held is None else held, self.tokens_per_block, chain=chain, promotion=promotion)
            self._next_task_id += 1
            if len(task.held) == 0:
                task.state = TaskState.COMPLETED
                task.finished = time.monotonic()
            self._tasks[task.id] = task
            if len(self._tasks) > _MAX_FINISHED_TASKS:
                self._trim_finished()
        return task

    def _trim_finished(self) -> None:
        """Forgets the oldest ended tasks nobody waited for, keeping the table bounded."""
        excess = len(self._tasks) - _MAX_FINISHED_TASKS
        for task_id in [t.id for t in self._tasks.values() if t.state.final][:excess]:
            del self._tasks[task_id]

    def _claim_for_launch(self, ids: list[int]) -> list[Task]:
        """Takes every task of a launch (all or none) and counts the launch as in flight."""
        with self._cond:
            if self._tier is None or self._closing:
                raise TaskError("launch: KVManager is not started (or is shutting down)")
            tasks: list[Task] = []
            for task_id in ids:
                task = self._tasks.get(task_id)
                if task is None:
                    raise TaskError(f"launch: unknown task id {task_id}")
                if not task.launchable() or task in tasks:
                    raise TaskError(f"launch: task {task_id} is {task.state.value} and was launched before; a task "
                                    "is launched once, after get_match or put_match")
                tasks.append(task)
            now = time.monotonic()
            for task in tasks:
                task.launched = now
                if task.state is TaskState.UNREADY:
                    task.state = TaskState.RUNNING
            self._launching += 1
            return tasks

    def _engine_blocks(self, slots: Any, task: Task, engine: EngineLayout | None) -> np.ndarray:
        """The engine block of each block the task moves, from the slots of its masked tokens."""
        s = _as_array(slots, "slot_mapping")
        if s.ndim != 1 or not np.issubdtype(s.dtype, np.integer):
            raise TaskError(f"task {task.id}: slot_mapping must be a 1-D integer array, got shape {s.shape} "
                            f"dtype {s.dtype}")
        n = task.num_tokens
        if len(s) != n:
            raise TaskError(f"task {task.id}: slot_mapping has {len(s)} slots but the task's mask marks {n} tokens")
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if engine is None:
            raise TaskError("launch: no KV memory registered; call register_kv_caches first")
        tpb = self.tokens_per_block
        s = s.astype(np.int64, copy=False).reshape(-1, tpb)
        first = s[:, 0]
        if (first % tpb).any() or (s != first[:, None] + np.arange(tpb)).any():
            raise TaskError(f"task {task.id}: slot_mapping must give each block's tokens consecutive slots starting "
                            f"at a multiple of tokens_per_block={tpb}")
        blocks = first // tpb
        if blocks.min() < 0 or blocks.max() >= engine.num_blocks:
            raise TaskError(f"task {task.id}: slot_mapping addresses engine blocks {int(blocks.min())}.."
                            f"{int(blocks.max())}, the registered KV memory has blocks 0..{engine.num_blocks - 1}")
        if task.type is TaskType.GET and len(np.unique(blocks)) != len(blocks):
            raise TaskError(f"task {task.id}: slot_mapping loads two blocks into the same engine block")
        return np.ascontiguousarray(blocks)

    def _submit(self, tasks: list[Task], plans: list[np.ndarray]) -> None:
        """Queues the copies of claimed, validated tasks; loads ahead of queued stores."""
        tier, engine = self._tier, self._engine
        assert tier is not None
        with self._cond:  # the completer looks jobs up in _running under this lock
            for k, (task, blocks) in enumerate(zip(tasks, plans)):
                if task.state is not TaskState.RUNNING:
                    continue  # nothing to copy: complete since the match
                if task.promotion is not None:
                    task.plan = blocks  # submitted by the promotion once its blocks are in the CPU tier
                    continue
                blocks = blocks[: len(task.copy_blocks)]  # a promotion may have delivered fewer blocks
                if len(blocks) == 0:
                    self._finish(task, TaskState.FAILED, "no promised block arrived from the SSD tier")
                    continue
                try:
                    assert engine is not None
                    direction = "host_to_engine" if task.type is TaskType.GET else "engine_to_host"
                    task.job_id = self._copy.submit(direction, self._layout_id, blocks, task.host_ids.astype(np.int64),
                                                    task.type is TaskType.GET, layerwise=task.layerwise)
                except Exception as e:  # the copy engine refused: end this task and those not yet queued
                    for rest in tasks[k:]:
                        if rest.state is not TaskState.RUNNING:
                            continue
                        if rest.promotion is not None:  # its SSD reads still write into its CPU blocks
                            rest.plan = None
                            rest.end_requested = (TaskState.FAILED, f"launch failed: {e}")
                            continue
                        self._finish(rest, TaskState.FAILED, f"launch failed: {e}")  # _cond is reentrant
                    raise TaskError(f"task {task.id}: {e}") from e
                self._running[task.job_id] = task

    def _match_and_launch(self, match: Any, token_ids: Any, slot_mapping: Any, token_mask: Any,
                          namespace: Sequence[str] | str | None) -> int:
        tokens, mask_in, first = self._check_tokens(token_ids, token_mask)
        if mask_in is None:
            mask_in = np.ones(len(tokens), dtype=bool)
        slots = _as_array(slot_mapping, "slot_mapping")
        if slots.ndim != 1 or len(slots) != int(mask_in.sum()) or not np.issubdtype(slots.dtype, np.integer):
            raise TaskError(f"slot_mapping has shape {slots.shape} dtype {slots.dtype}; it must hold one integer "
                            f"slot per token that token_mask marks ({int(mask_in.sum())})")
        # Whole blocks move: when token_mask starts inside a block, that block's leading slots follow from
        # the first given slot (a block's slots are consecutive).
        full = np.full(len(tokens), -1, dtype=np.int64)
        full[mask_in] = slots
        if len(slots):
            start = int(np.argmax(mask_in))
            lead = np.arange(first * self.tokens_per_block, start)
            full[lead] = full[start] - (start - lead)
        task_id, mask = match(tokens, mask_in, namespace)
        self.launch(task_id, full[mask])
        return task_id

    def _complete_loop(self) -> None:
        """Ends tasks as their copies finish, in the order they finish; exits after shutdown() once idle."""
        while True:
            copy = self._copy
            done = copy.next_completion(50_000)
            job, copy_error = (done[0], done[2]) if done is not None else (0, "")
            with self._cond:
                task = self._running.pop(job, None) if job else None
                if task is None:
                    if self._closing and not self._running and not self._launching and not self._promoting:
                        return
                    continue
                if copy_error:  # part of the copy may be missing: a get reports no tokens, so nothing is trusted
                    task.copy_blocks = task.copy_blocks[:0]
                task.error = task.error or copy_error or None
            self._finish(task, TaskState.FAILED if task.error else TaskState.COMPLETED, task.error)

    def _finish(self, task: Task, state: TaskState, error: str | None) -> None:
        """Ends a task: a completed put makes its blocks ready (and starts their write-through to SSD),
        everything else unlocks them. A task that did not complete reports only blocks that arrived."""
        tier = self._tier
        if tier is not None and len(task.held):
            try:
                if task.type is TaskType.PUT and state is TaskState.COMPLETED:
                    self._commit_put(tier, task)
                else:
                    tier.index.release(task.held)
            except Exception as e:  # an index bug: never leave the blocks locked or the engine waiting
                logger.error("task %d: ending it in the index failed: %s", task.id, e)
                state, error = TaskState.FAILED, f"{error or ''} index update failed: {e}".strip()
                try:
                    tier.index.release(task.held)
                except Exception as e2:
                    logger.error("task %d: unlocking its blocks failed too: %s", task.id, e2)
        if state is not TaskState.COMPLETED and not (task.type is TaskType.GET and task.job_id):
            task.copy_blocks = task.copy_blocks[:0]  # nothing reached the engine
        if error:
            logger.warning("task %d (%s) %s: %s", task.id, task.type.value, state.value, error)
        with self._cond:
            task.state = state
            task.error = error
            task.finished = time.monotonic()
            if state is TaskState.FAILED:
                self.stats.tasks_failed += 1
            elif state is TaskState.CANCELLED:
                self.stats.tasks_cancelled += 1
            self._cond.notify_all()

    def _report(self, task_id: int) -> KVResponse:
        task = self._tasks.get(task_id)
        if task is None:
            return KVResponse(KVResponseStatus.NOTFOUND, task_id, None)
        if task.state is TaskState.UNREADY:
            return KVResponse(KVResponseStatus.UNREADY, task_id, None)
        if task.state is TaskState.RUNNING:
            return KVResponse(KVResponseStatus.TIMEOUT, task_id, None)
        del self._tasks[task_id]
        return KVResponse(task.response_status(), task_id, task.token_mask(), task.error)


def _task_ids(task_ids: int | Iterable[int], unique: bool = True) -> list[int]:
    """Task ids as a list in the order given, without repeats when unique."""
    if isinstance(task_ids, (int, np.integer)):
        return [int(task_ids)]
    try:
        ids = [int(t) for t in task_ids]
        return list(dict.fromkeys(ids)) if unique else ids
    except (TypeError, ValueError) as e:
        raise TaskError(f"task_ids must be an int or a list of ints, got {task_ids!r}") from e


def _stream_handle(stream: Any) -> int:
    """A cudaStream_t as int, from a torch.cuda.Stream (or anything with ``cuda_stream``) or an int."""
    handle = getattr(stream, "cuda_stream", stream)
    if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
        raise TaskError(f"stream must be a torch.cuda.Stream or a cudaStream_t as int, got {type(stream).__name__}")
    return int(handle)


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "numpy") and hasattr(x, "dtype") and hasattr(x, "device")


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if _is_tensor(x):
        if str(x.device) != "cpu":
            raise TaskError(f"{what} must be on the CPU, got a tensor on {x.device}")
        return x.detach().numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise TaskError(f"{what} must be an array, got {type(x).__name__}") from e
