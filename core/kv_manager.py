"""KVManager: FlexKV's task API (``flexkv.KVManager``, also ``flexkv.kvmanager.KVManager``), a facade over the
control plane of the C++ core (``core/control_plane.py``), which owns the tiers, the task state machine, the
SSD flows and the counters.

``get_match`` locks a request's cached blocks and returns the mask of the tokens it can load (blocks found
only on SSD start coming up at once); ``launch`` gives the engine slots of those tokens and starts the copy;
``wait`` / ``try_wait`` report the end. ``put_match`` + ``launch`` store. Every task ends, on every path,
with its blocks unlocked. Another process may move the bytes instead (``take_external`` /
``finish_external``, as vLLM's worker does), with the CPU tier mapped through ``tier_info``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from flexkv import _core

from . import task_args as args
from .config import CacheConfig, ModelConfig
from .control_plane import checked_config, open_control_plane
from .errors import FlexKVError, TaskError
from .layout import EngineLayout, KVCacheLayout, model_layout
from .local_registry import register_manager, unregister_manager
from .manager_ranks import ManagerRanks
from .request import KVResponse
from .server_launch import ServerSettings, client_instance, open_client_plane, stop_embedded_server

logger = logging.getLogger("flexkv")

_TOKEN_COUNTERS = ("get_query", "get_hit", "put_new", "put_cached", "put_dropped", "put_no_prefix", "ssd_hit")
Namespace = Sequence[str] | str | None


class KVManager:
    """``layout_tag`` names the engine's byte order inside a block (engines with different ones never share
    blocks); ``namespace`` salts every request of this manager. ``control_plane`` shares another facade's
    cache (its blocks, tiers and counters) instead of opening one; ``ssd_env`` (a ``FaultInjectingIoEnv``)
    replaces the SSD tier's I/O for tests. ``server_recv_port``, ``gpu_register_port``, ``dp_client_id`` and
    ``event_collector`` are FlexKV's. The manager is a client of ``flexkv serve`` at ``server_recv_port`` when
    the config asks for server mode (``server_client_mode``, ``dp_size > 1``, ``instance_num > 1``;
    ``server_settings`` default to the config file's and ``FLEXKV_*``)."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dp_client_id: int = 0,
                 server_recv_port: str = "", gpu_register_port: str = "", event_collector: Any = None, *,
                 namespace: str = "", layout_tag: str = "", num_copy_threads: int = 2, ssd_io_engine: str = "auto",
                 ssd_env: Any = None, control_plane: Any = None, server_settings: ServerSettings | None = None) -> None:
        settings = server_settings if server_settings is not None else ServerSettings.from_env()
        if server_recv_port:
            settings = dataclasses.replace(settings, server_recv_port=server_recv_port)
        self._client_mode = (control_plane is None and isinstance(model_config, ModelConfig)
                             and settings.client_mode(model_config))  # checked_config names a wrong type
        resolved = checked_config(model_config, cache_config, server=self._client_mode)
        if dp_client_id != 0 and not self._client_mode:
            raise FlexKVError(f"dp_client_id = {dp_client_id} needs model_config.dp_size > 1 (server mode)")
        if isinstance(num_copy_threads, bool) or not isinstance(num_copy_threads, int) or num_copy_threads < 1:
            raise TaskError(f"num_copy_threads must be a positive int, got {num_copy_threads!r}")
        self.model_config, self.cache_config = model_config, resolved
        self.tokens_per_block = resolved.tokens_per_block
        self.block_bytes = model_config.block_bytes(self.tokens_per_block)
        self.server_recv_port, self.gpu_register_port = settings.server_recv_port, gpu_register_port
        self.dp_client_id, self.server_settings = dp_client_id, settings
        self._server_child: Any = None  # the embedded `flexkv serve` this manager started
        self._ranks: ManagerRanks | None = None  # KV memory in rank processes (server mode, tp_size > 1)
        if ManagerRanks.needed(self._client_mode, model_config):
            instance = client_instance(settings, model_config, dp_client_id) if self._client_mode else 0
            self._ranks = ManagerRanks(self, self._client_mode, instance)
        self.event_collector = event_collector
        self.layout_tag = layout_tag
        self._salt = [namespace] if namespace else []
        self._plane_args = {"num_copy_threads": num_copy_threads, "ssd_io_engine": ssd_io_engine, "ssd_env": ssd_env}
        self._shared_plane = control_plane
        self._cp: Any = None
        self._owns_plane = False
        self._engine: EngineLayout | None = None
        self._layout = -1  # the control plane's handle of the registered engine memory
        self._seeds: dict[tuple[str, ...], np.ndarray] = {}
        self._launch_listeners: list[Callable[[list[int], bool, int], None]] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def control_plane(self) -> Any:
        """The control plane this manager drives (after start()): another facade may share it."""
        return self._cp

    def start(self) -> None:
        """Opens the tiers (or joins the given control plane). Idempotent."""
        if self._cp is not None and not self._cp.closed:
            return
        if self.gpu_register_port:  # first: a port in use refuses the start before anything is allocated
            register_manager(self.gpu_register_port, self)
        try:
            if self._shared_plane is not None:
                self._cp = self._shared_plane
            elif self._client_mode:
                self._cp, self._server_child = open_client_plane(self.model_config, self.cache_config,
                                                                 self.server_settings, self.dp_client_id, "KVManager")
                self._owns_plane = True
            else:
                self._cp = open_control_plane(self.model_config, self.cache_config, **self._plane_args)
                self._owns_plane = True
            if self._ranks is not None:
                self._ranks.start(self._cp)
                if self._engine is not None:
                    self._ranks.register(self._engine)
            elif self._engine is not None:
                self._layout = self._register(self._engine)
        except BaseException:
            self._release_plane()
            raise

    @property
    def uses_ranks(self) -> bool:
        """True when rank processes copy the blocks (server mode, or tp_size > 1): KV memory registers with
        KVTPClient.register_to_server in each rank."""
        return self._ranks is not None

    @property
    def engine_layout(self) -> EngineLayout | None:
        """The registered engine KV memory."""
        return self._engine

    def is_ready(self) -> bool:
        """True once started and the engine's KV memory is registered (by every rank, where ranks copy)."""
        if self._cp is None or self._cp.closed:
            return False
        if self._ranks is None:
            return self._engine is not None
        if self._client_mode:
            got, want = self._cp.ranks_ready()
            return want > 0 and got == want
        return self._layout >= 0

    def shutdown(self) -> None:
        """Refuses new launches, cancels tasks not yet launched, waits for copies in flight and stops the
        cache (one this manager opened; a shared one stays). Tasks that ended can still be waited for."""
        if self._cp is not None and not self._cp.closed:
            self._release_plane(keep_results=True)

    def _release_plane(self, keep_results: bool = False) -> None:
        if self._ranks is not None:
            self._ranks.close()
        cp = self._cp
        if cp is not None and self._owns_plane:
            cp.shutdown()
        elif cp is not None and self._layout >= 0 and not cp.closed:
            cp.unregister_layout(self._layout)
        self._cp = cp if keep_results and self._owns_plane else None
        self._owns_plane, self._layout = False, -1
        stop_embedded_server(self._server_child)
        self._server_child = None
        if self.gpu_register_port:
            unregister_manager(self.gpu_register_port, self)

    def __enter__(self) -> KVManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def register_kv_caches(self, kv_caches: Any, kv_layout: KVCacheLayout | None = None) -> None:
        """Registers the engine's KV memory: per-layer tensors or one tensor described by ``kv_layout``, or an
        ``EngineLayout`` (``kv_layout`` None) for layouts ``KVCacheLayoutType`` cannot express."""
        layout = model_layout(kv_caches, kv_layout, self.model_config, self.tokens_per_block)
        layout.validate()
        if self._ranks is not None:
            if self._cp is not None:
                self._ranks.register(layout)
        elif self._cp is not None:
            handle = self._register(layout)
            if self._layout >= 0:
                try:
                    self._cp.unregister_layout(self._layout)
                except BaseException:
                    self._cp.unregister_layout(handle)
                    raise
            self._layout = handle
        self._engine = layout

    def _register(self, layout: EngineLayout) -> int:
        return self._cp.register_layout(layout.grouped_segments(), layout.num_blocks,
                                        layout.cuda_index if layout.is_cuda else -1)

    # ---------------------------------------------------------------- matching

    def get_match(self, token_ids: Any, token_mask: Any = None, namespace: Namespace = None, *,
                  block_hashes: Any = None, chain: Any = None) -> tuple[int, np.ndarray]:
        """Locks the cached blocks the masked tokens need; returns (task_id, mask of the tokens it loads).
        ``token_mask`` is False for a prefix the engine has. ``block_hashes`` (one 128-bit hash per whole
        block, e.g. vLLM's ``request.block_hashes``) key the blocks instead of hashing the tokens again;
        ``chain`` (from :meth:`key_chain`) reuses keys made before."""
        tokens, _, first = args.check_tokens(token_ids, token_mask, self.tokens_per_block)
        run = chain if chain is not None else self._run(tokens, namespace, block_hashes)
        task, blocks, _ = self._plane().get_match(run, first, len(tokens))
        return task, args.token_mask(len(tokens), blocks, self.tokens_per_block)

    def put_match(self, token_ids: Any, token_mask: Any = None, namespace: Namespace = None, *,
                  block_hashes: Any = None, chain: Any = None) -> tuple[int, np.ndarray]:
        """Reserves CPU blocks for the masked tokens' blocks not cached yet; returns (task_id, mask of the
        tokens to store). The blocks before the mask must be cached already, else nothing is stored."""
        tokens, _, first = args.check_tokens(token_ids, token_mask, self.tokens_per_block)
        run = chain if chain is not None else self._run(tokens, namespace, block_hashes)
        task, blocks, _ = self._plane().put_match(run, first, len(tokens))
        return task, args.token_mask(len(tokens), blocks, self.tokens_per_block)

    def lookup(self, token_ids: Any, namespace: Namespace = None, *, block_hashes: Any = None,
               chain: Any = None) -> tuple[int, int]:
        """(tokens of the leading whole blocks ready in the CPU tier, the same on SSD), locking nothing."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        run = chain if chain is not None else self._run(tokens, namespace, block_hashes)
        cpu, ssd = self._plane().lookup(run)
        return cpu * self.tokens_per_block, ssd * self.tokens_per_block

    def prefetch_async(self, token_ids: Any, namespace: Namespace = None, *, chain: Any = None) -> int:
        """Promotes the blocks only slower tiers hold into the CPU tier; a task that needs no launch."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        run = chain if chain is not None else self._run(tokens, namespace, None)
        return int(self._plane().prefetch(run, len(tokens)))

    def key_chain(self, token_ids: Any, namespace: Namespace = None, *, block_hashes: Any = None) -> Any:
        """The keys of ``token_ids``' whole blocks (salted from ``block_hashes`` when given: no token is hashed),
        to pass as ``chain=`` to lookup / get_match / put_match / prefetch_async with the same token ids, so a
        request's prompt is keyed once for all of them."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        return self._run(tokens, namespace, block_hashes)

    def invalidate(self, token_ids: Any, namespace: Namespace = None, *, from_token: int = 0,
                   chain: Any = None) -> int:
        """Makes the CPU tier's cached blocks of ``token_ids`` from ``from_token`` on unreadable, as if they had
        been evicted (the next put rewrites them); returns how many tokens it dropped."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        start = max(0, int(from_token)) // self.tokens_per_block
        run = chain if chain is not None else self._run(tokens, namespace, None)
        return int(self._plane().invalidate(run, start)) * self.tokens_per_block

    def block_keys(self, token_ids: Any, namespace: Namespace = None) -> np.ndarray:
        """The (n, 2) uint64 block keys of the whole blocks of ``token_ids``: the same in every facade."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        return _core.chain_block_keys(self._seed(namespace), tokens, self.tokens_per_block)

    # ------------------------------------------------------------------ copies

    def launch(self, task_ids: int | Sequence[int], slot_mappings: Any, as_batch: bool = False,
               layerwise_transfer: bool = False, counter_id: int = 0) -> list[int]:
        """Starts the copies of matched tasks; ``slot_mappings[i]`` holds the engine slots (``block_id *
        tokens_per_block + offset``) of the tokens task i's mask marks. All or nothing: an unknown or
        launched id launches nothing; a bad slot mapping fails every task of the call (TaskError either way).
        ``as_batch`` and ``counter_id`` are accepted for the engines that pass them; listeners hear the id."""
        ids = args.task_ids(task_ids, unique=False)
        if isinstance(slot_mappings, np.ndarray) or args.is_tensor(slot_mappings):
            slot_mappings = [slot_mappings]
        if not isinstance(slot_mappings, (list, tuple)):
            raise TaskError("launch: slot_mappings must be an array of engine slots or a list of them, one per "
                            f"task; got {type(slot_mappings).__name__}")
        if len(slot_mappings) != len(ids):
            raise TaskError(f"launch: {len(ids)} task ids but {len(slot_mappings)} slot mappings")
        targets = [args.slot_target(s) for s in slot_mappings]
        self._plane("launch").launch(ids, targets, True, self._layout, bool(layerwise_transfer))
        for listener in list(self._launch_listeners):
            try:
                listener(ids, bool(layerwise_transfer), int(counter_id))
            except Exception:  # a listener's failure is its own; the copies are already queued
                logger.exception("FlexKV: a launch listener failed")
        return ids

    def add_launch_listener(self, listener: Callable[[list[int], bool, int], None]) -> None:
        """Calls ``listener(task_ids, layerwise_transfer, counter_id)`` after every successful launch."""
        self._launch_listeners.append(listener)

    def get_async(self, token_ids: Any, slot_mapping: Any, token_mask: Any = None, namespace: Namespace = None) -> int:
        """get_match + launch. ``slot_mapping`` holds the slots of the tokens ``token_mask`` marks."""
        return self._match_and_launch(self.get_match, token_ids, slot_mapping, token_mask, namespace)

    def put_async(self, token_ids: Any, slot_mapping: Any, token_mask: Any = None, namespace: Namespace = None) -> int:
        """put_match + launch. ``slot_mapping`` holds the slots of the tokens ``token_mask`` marks."""
        return self._match_and_launch(self.put_match, token_ids, slot_mapping, token_mask, namespace)

    def _match_and_launch(self, match: Any, token_ids: Any, slot_mapping: Any, token_mask: Any,
                          namespace: Namespace) -> int:
        tokens, mask_in, first = args.check_tokens(token_ids, token_mask, self.tokens_per_block)
        mask_in, full = args.whole_block_slots(tokens, mask_in, first, slot_mapping, self.tokens_per_block)
        task_id, mask = match(tokens, mask_in, namespace)
        self.launch(task_id, full[mask])
        return task_id

    def take_external(self, task_id: int, timeout: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
        """Claims a matched task for a copy made elsewhere; returns (sequence index of each block to copy, its
        CPU block id). Waits up to ``timeout`` s for blocks coming up from SSD (0: never waits); blocks that
        failed to come up are left out; if the SSD reads are still running at the timeout it hands out
        nothing and the task ends failed. End it with finish_external (try_take_external never waits)."""
        seq, host = self._plane("take_external").take(int(task_id), float(timeout))
        return seq, host

    def try_take_external(self, task_id: int) -> tuple[np.ndarray, np.ndarray] | None:
        """take_external that never waits: None, the task unchanged, while its blocks come up from SSD."""
        return self._plane("take_external").try_take(int(task_id))

    def finish_external(self, task_id: int, ok: bool, error: str | None = None) -> None:
        """Ends a task claimed by take_external (a put's blocks become readable when ``ok``)."""
        self._plane("finish_external").complete(int(task_id), bool(ok), error or "")

    def tier_info(self) -> dict[str, Any]:
        """What a worker process needs to map the CPU tier (``flexkv.core.cpu_tier.map_cpu_tier``): the socket
        that hands out its memory and its geometry, ``{"socket", "num_blocks", "block_stride", "block_bytes",
        "size"}``."""
        return dict(self._plane().tier_info())

    # ------------------------------------------------------------------- waits

    def wait(self, task_ids: int | Iterable[int], timeout: float = 20.0, completely: bool = False,
             ) -> dict[int, KVResponse]:
        """Waits up to ``timeout`` s for the tasks to end; an ended task is reported once and forgotten
        (NOTFOUND after), a matched one is UNREADY, a running one TIMEOUT. With ``completely``, a put also
        waits for its write-through to SSD."""
        reports = self._tasks().wait(args.task_ids(task_ids), max(0.0, float(timeout)), bool(completely))
        return args.responses(reports, self.tokens_per_block)

    def try_wait(self, task_ids: int | Iterable[int]) -> dict[int, KVResponse]:
        """Like wait(timeout=0) but leaves out tasks that are still running."""
        return args.responses(self._tasks().try_wait(args.task_ids(task_ids)), self.tokens_per_block)

    def wait_layer(self, task_id: int, layer: int, stream: Any = None, timeout: float = 20.0) -> bool:
        """Waits until ``layer`` of a launched get is in the engine's KV memory (with ``stream``, a
        torch.cuda.Stream or cudaStream_t, makes the stream wait instead). False if the task ended without
        completing or ``timeout`` s passed. Layers arrive one by one for a layer-wise launch on the GPU."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or \
                not 0 <= int(layer) < self.model_config.num_layers:
            raise TaskError(f"wait_layer: layer must be an int in [0, {self.model_config.num_layers}), got {layer!r}")
        handle = None if stream is None else args.stream_handle(stream)
        return bool(self._plane().wait_layer(int(task_id), int(layer), handle, max(0.0, float(timeout))))

    def cancel(self, task_ids: int | Iterable[int]) -> None:
        """Cancels tasks not yet launched and unlocks their blocks. Running tasks finish normally."""
        self._plane().cancel(args.task_ids(task_ids))

    def reset(self) -> None:
        """Drops every cached block from the indexes (SSD blocks stay on disk: a restart finds them).
        TaskError while a task holds blocks or a write-through runs."""
        self._plane().reset()

    def cache_stats(self) -> dict[str, Any]:
        """The control plane's counters (blocks, and tokens under FlexKV's names) and its indexes' state."""
        cp = self._plane()
        out: dict[str, Any] = dict(cp.counters())
        for name in _TOKEN_COUNTERS:
            out[f"{name}_tokens"] = out[f"{name}_blocks"] * self.tokens_per_block
        out["hit_rate"] = out["get_hit_blocks"] / out["get_query_blocks"] if out["get_query_blocks"] else 0.0
        out.update(cp.index_counts())
        return out

    # -------------------------------------------------------------- internals

    def _tasks(self) -> Any:
        """The control plane whose tasks wait() reports: also once it is shut down."""
        if self._cp is None:
            raise TaskError("KVManager is not started; call start() first")
        return self._cp

    def _plane(self, call: str | None = None) -> Any:
        cp = self._cp
        if cp is None or cp.closed:
            where = f"{call}: " if call else ""
            raise TaskError(f"{where}KVManager is not started (or is shutting down); call start() first")
        return cp

    def _seed(self, namespace: Namespace) -> np.ndarray:
        salts = (*self._salt, *args.namespace_parts(namespace))
        seed = self._seeds.get(salts)
        if seed is None:
            seed = self._seeds[salts] = _core.namespace_seed(self.model_config.fingerprint(), self.tokens_per_block,
                                                             self.layout_tag, list(salts))
        return seed

    def _run(self, tokens: np.ndarray, namespace: Namespace, block_hashes: Any) -> Any:
        cp = self._plane()
        seed = self._seed(namespace)
        if block_hashes is None:
            return cp.token_run(seed, tokens)
        return cp.hash_run(seed, args.hashes_array(block_hashes), tokens)
