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
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from flexkv import _core

from . import task_args as args
from .config import CacheConfig, ModelConfig
from .control_plane import checked_config, open_control_plane, remote_tier_of, shutdown_plane
from .errors import FlexKVError, TaskError
from .layout import EngineLayout, KVCacheLayout, model_layout
from .local_registry import manager_for, register_manager, unregister_manager
from .manager_ranks import ManagerRanks, rank_port
from .metrics import PlaneObservers, plane_snapshot
from .remote_flow import RemoteFlow
from .request import KVResponse, KVResponseStatus
from .server_launch import ServerSettings, client_instance, open_client_plane, stop_embedded_server
from .task_book import TaskBook

logger = logging.getLogger("flexkv")

_TOKEN_COUNTERS = ("get_query", "get_hit", "put_new", "put_cached", "put_dropped", "put_no_prefix", "ssd_hit")
Namespace = Sequence[str] | str | None


@dataclasses.dataclass(frozen=True)
class KeyChain:
    """The keys of a token run's whole blocks, made once (``KVManager.key_chain``) and reused by every call on
    the same tokens: ``run`` is the control plane's, ``hashes`` the engine block hashes they were salted from
    (None: from token ids), ``namespace`` the one they were made in."""

    run: Any
    hashes: np.ndarray | None
    namespace: Namespace


class KVManager:
    """``layout_tag`` names the engine's byte order inside a block (engines with different ones never share
    blocks); ``namespace`` salts every request of this manager. ``control_plane`` shares another facade's
    cache (its blocks, tiers and counters) instead of opening one; ``ssd_env`` (a ``FaultInjectingIoEnv``)
    replaces the SSD tier's I/O for tests. ``server_recv_port``, ``gpu_register_port``, ``dp_client_id`` and
    ``event_collector`` are FlexKV's. The manager is a client of ``flexkv serve`` at ``server_recv_port`` when
    the config asks for server mode (``server_client_mode``, ``dp_size > 1``, ``instance_num > 1``;
    ``server_settings`` default to the config file's and ``FLEXKV_*``). ``external_copies``: every rank's
    process copies its own head slice through ``take_external`` / ``finish_external`` and a ``DataPlane`` on
    ``tier_info`` (vLLM's workers do), so a manager with ``tp_size > 1`` hosts no rank dispatcher."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, dp_client_id: int = 0,
                 server_recv_port: str = "", gpu_register_port: str = "", event_collector: Any = None, *,
                 namespace: str = "", layout_tag: str = "", num_copy_threads: int = 2, ssd_io_engine: str = "auto",
                 ssd_env: Any = None, control_plane: Any = None, server_settings: ServerSettings | None = None,
                 external_copies: bool = False) -> None:
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
        # As the original FlexKV: without a gpu_register_port, `<server_recv_port>_gpu_register` (its KVTPClient
        # reads kvmanager.gpu_register_port); a default port another manager of this process holds is left to it.
        self._port_given = bool(gpu_register_port)
        self.server_recv_port = settings.server_recv_port
        self.gpu_register_port = gpu_register_port or rank_port("", settings.server_recv_port)
        self.dp_client_id, self.server_settings = dp_client_id, settings
        self._server_child: Any = None  # the embedded `flexkv serve` this manager started
        self._ranks: ManagerRanks | None = None  # KV memory in rank processes (server mode, tp_size > 1)
        if ManagerRanks.needed(self._client_mode, model_config, external_copies):
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
        self._book = TaskBook()
        self._kinds: dict[int, str] = {}  # task id -> "get" / "put", for as_batch (dropped when launched)
        self._observers: PlaneObservers | None = None  # metrics endpoint and log line of a plane it opened
        self._remote: RemoteFlow | None = None  # the plane's remote tier, when it has one

    @property
    def server_client_mode(self) -> bool:
        """True when this manager is a client of `flexkv serve` (the original FlexKV's attribute)."""
        return self._client_mode

    @property
    def kv_task_engine(self) -> Any:
        """The original FlexKV's task-engine attribute, as far as its callers read it (a snapshot): ``tasks`` (the
        ids that can still be waited for), ``graph_to_task`` (always empty: no transfer graphs here) and
        ``cache_engine.cpu_cache_engine.mempool`` (``num_free_blocks``, ``num_total_blocks`` of the CPU tier)."""
        from types import SimpleNamespace

        cpu = self.cache_stats()["cpu"] if self._cp is not None and not self._cp.closed else {}
        mempool = SimpleNamespace(num_free_blocks=cpu.get("num_free", 0),
                                  num_total_blocks=self.cache_config.num_cpu_blocks)
        return SimpleNamespace(tasks=self._book.ids(), graph_to_task={},
                               cache_engine=SimpleNamespace(cpu_cache_engine=SimpleNamespace(mempool=mempool)))

    # ----------------------------------------------------------------- lifecycle

    @property
    def control_plane(self) -> Any:
        """The control plane this manager drives (after start()): another facade may share it."""
        return self._cp

    def start(self) -> None:
        """Opens the tiers (or joins the given control plane). Idempotent."""
        if self._cp is not None and not self._cp.closed:
            return
        if self._port_given:  # first: a port in use refuses the start before anything is allocated
            register_manager(self.gpu_register_port, self)
        elif manager_for(self.gpu_register_port) is None:
            try:
                register_manager(self.gpu_register_port, self)
            except RuntimeError:  # another manager of this process took the default port just now: it keeps it
                pass
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
                self._observers = self._observe(self._cp)
            tier = remote_tier_of(self._cp)
            self._remote = RemoteFlow(self._cp, tier, self.tokens_per_block) if tier is not None else None
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
    def remote_tier(self) -> Any:
        """The control plane's remote tier (flexkv.core.remote_tier.RemoteTier), or None without one."""
        return None if self._remote is None else self._remote.tier

    @property
    def uses_ranks(self) -> bool:
        """True when rank processes copy the blocks (server mode, or tp_size > 1): KV memory registers with
        KVTPClient.register_to_server in each rank."""
        return self._ranks is not None

    @property
    def rank_agent(self) -> Any:
        """The RankAgent that copies this process's KV memory when ranks copy (``register_kv_caches`` made it):
        ``wait_task`` waits for this rank's part of a load. None otherwise."""
        return self._ranks.agent if self._ranks is not None else None

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

    def _observe(self, cp: Any) -> PlaneObservers:
        """The config's metrics_port (Prometheus) and periodic log line for a plane in this process."""
        st = self.server_settings
        return PlaneObservers(lambda: plane_snapshot(cp), self.tokens_per_block, metrics_port=st.metrics_port,
                              every_requests=st.num_log_interval_requests, every_s=st.log_interval_seconds)

    def _release_plane(self, keep_results: bool = False) -> None:
        if self._observers is not None:
            self._observers.close()
            self._observers = None
        if self._ranks is not None:
            self._ranks.close()
        cp = self._cp
        if cp is not None and self._owns_plane:
            shutdown_plane(cp)
        elif cp is not None and self._layout >= 0 and not cp.closed:
            cp.unregister_layout(self._layout)
        self._cp = cp if keep_results and self._owns_plane else None
        self._owns_plane, self._layout, self._remote = False, -1, None
        stop_embedded_server(self._server_child)
        self._server_child = None
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

    def get_match(self, token_ids: Any, token_mask: Any = None, cpu_only: bool = False, namespace: Namespace = None,
                  swa_aware: bool = False, *, block_hashes: Any = None, chain: KeyChain | None = None
                  ) -> tuple[int, np.ndarray]:
        """Locks the cached blocks the masked tokens need; returns (task_id, mask of the tokens it loads).
        ``token_mask`` is False for a prefix the engine has. ``cpu_only`` loads only what the CPU tier holds
        now (nothing comes up from SSD). ``block_hashes`` (one 128-bit hash per whole block, e.g. vLLM's
        ``request.block_hashes``) key the blocks instead of hashing the tokens again; ``chain`` (from
        :meth:`key_chain`) reuses keys made before. The order of the arguments is the original FlexKV's
        (``namespace`` is the fourth); ``swa_aware`` must stay False."""
        args.check_flag("get_match", "cpu_only", cpu_only, 3, "namespace=... by keyword")
        args.check_flag("get_match", "swa_aware", swa_aware, 5, "")
        if swa_aware:
            raise TaskError("get_match: swa_aware=True needs sliding-window (SWA) pools, which this version lacks")
        tokens, mask_in, first = args.check_tokens(token_ids, token_mask, self.tokens_per_block)
        n = len(tokens)
        chain = self._chain(tokens, namespace, block_hashes, chain)
        if cpu_only:  # match the prefix the CPU tier holds; the rest of the mask stays False
            n = min(n, self.lookup(tokens, namespace, chain=chain)[0])
            if first * self.tokens_per_block >= n:
                n, first = 0, 0
            run = chain.run
            if n < len(tokens):
                hashes = None if chain.hashes is None else chain.hashes[: n // self.tokens_per_block]
                run = self._run(tokens[:n], chain.namespace, hashes)
            task, blocks, _ = self._plane().get_match(run, first, n)
        else:
            if self._remote is not None:  # remote-only blocks after the local ones come up first (bounded)
                self._remote.promote(chain.run, self._run_of(tokens, chain.namespace, chain.hashes), len(tokens))
            task, blocks, _ = self._plane().get_match(chain.run, first, n)
        self._track(task, "get")
        return task, args.token_mask(len(tokens), blocks, self.tokens_per_block)

    def put_match(self, token_ids: Any, token_mask: Any = None, namespace: Namespace = None, *,
                  block_hashes: Any = None, chain: Any = None) -> tuple[int, np.ndarray]:
        """Reserves CPU blocks for the masked tokens' blocks not cached yet; returns (task_id, mask of the
        tokens to store). The blocks before the mask must be cached already, else nothing is stored."""
        tokens, _, first = args.check_tokens(token_ids, token_mask, self.tokens_per_block)
        run = self._chain(tokens, namespace, block_hashes, chain).run
        task, blocks, covered = self._plane().put_match(run, first, len(tokens))
        if self._remote is not None:
            self._remote.note_put(task, run, covered)
        self._track(task, "put")
        return task, args.token_mask(len(tokens), blocks, self.tokens_per_block)

    def lookup(self, token_ids: Any, namespace: Namespace = None, *, block_hashes: Any = None,
               chain: KeyChain | None = None) -> tuple[int, int]:
        """(tokens of the leading whole blocks ready in the CPU tier, the same in the slower tiers: on SSD, or
        on SSD and then in the remote tier when there is one), locking nothing. prefetch_async brings the
        slower tiers' blocks up."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        run = self._chain(tokens, namespace, block_hashes, chain).run
        if self._remote is not None:
            cpu, ssd, remote = self._remote.plan(run)
            return cpu * self.tokens_per_block, (max(cpu, ssd) + remote) * self.tokens_per_block
        cpu, ssd = self._plane().lookup(run)
        return cpu * self.tokens_per_block, ssd * self.tokens_per_block

    def prefetch_async(self, token_ids: Any, namespace: Namespace = None, *, chain: KeyChain | None = None) -> int:
        """Promotes the blocks only slower tiers (SSD, remote) hold into the CPU tier; a task that needs no
        launch (wait / try_wait report its end)."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        chain = self._chain(tokens, namespace, None, chain)
        if self._remote is not None:
            job = self._remote.prefetch(chain.run, self._run_of(tokens, chain.namespace, chain.hashes), len(tokens))
            if not self._remote.is_job(job):
                self._track(job, "prefetch")
            return job
        task = int(self._plane().prefetch(chain.run, len(tokens)))
        self._track(task, "prefetch")
        return task

    def key_chain(self, token_ids: Any, namespace: Namespace = None, *, block_hashes: Any = None) -> KeyChain:
        """The keys of ``token_ids``' whole blocks (salted from ``block_hashes`` when given: no token is hashed),
        to pass as ``chain=`` to lookup / get_match / put_match / prefetch_async / invalidate with the same token
        ids, so a request's prompt is keyed once for all of them."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        return self._chain(tokens, namespace, block_hashes, None)

    def invalidate(self, token_ids: Any, namespace: Namespace = None, *, from_token: int = 0,
                   chain: Any = None) -> int:
        """Makes the CPU tier's cached blocks of ``token_ids`` from ``from_token`` on unreadable, as if they had
        been evicted (the next put rewrites them); returns how many tokens it dropped."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        start = max(0, int(from_token)) // self.tokens_per_block
        run = self._chain(tokens, namespace, None, chain).run
        return int(self._plane().invalidate(run, start)) * self.tokens_per_block

    def block_keys(self, token_ids: Any, namespace: Namespace = None) -> np.ndarray:
        """The (n, 2) uint64 block keys of the whole blocks of ``token_ids``: the same in every facade."""
        tokens, _, _ = args.check_tokens(token_ids, None, self.tokens_per_block)
        return _core.chain_block_keys(self._seed(namespace), tokens, self.tokens_per_block)

    # ------------------------------------------------------------------ copies

    def launch(self, task_ids: int | Sequence[int], slot_mappings: Any, swa_slot_mappings: Any = None,
               as_batch: bool = False, layerwise_transfer: bool = False, counter_id: int = 0) -> list[int]:
        """Starts the copies of matched tasks; ``slot_mappings[i]`` holds the engine slots of the tokens task i's
        mask marks: ``block_id * tokens_per_block + offset`` per token, or every token of a block given the
        block's first slot (the original FlexKV's convention). All or nothing: an unknown or launched id
        launches nothing; a bad slot mapping fails every task of the call (TaskError either way).

        ``as_batch`` merges several gets (or several puts), or a layer-wise launch, into one batch task as the
        original FlexKV does: the call returns ``[batch_id]``, a wait on it answers once with the list of the
        tasks' masks, a wait on a merged task's id answers NOTFOUND. Otherwise it returns the task ids.
        ``swa_slot_mappings`` (the original's third argument) must be None; listeners hear the task ids.
        ``counter_id`` (SGLang's layer-done counter) goes with a layer-wise launch to the ranks' agents and to the
        launch listeners."""
        if isinstance(swa_slot_mappings, bool):
            raise TaskError("launch: the third argument is swa_slot_mappings (the original FlexKV's order), got a "
                            "bool; pass as_batch=... by keyword")
        if swa_slot_mappings is not None and any(m is not None for m in (
                swa_slot_mappings if isinstance(swa_slot_mappings, (list, tuple)) else [swa_slot_mappings])):
            raise TaskError("launch: swa_slot_mappings needs sliding-window (SWA) pools, which this version lacks")
        args.check_flag("launch", "as_batch", as_batch, 4, "")
        ids = args.task_ids(task_ids, unique=False)
        if isinstance(slot_mappings, np.ndarray) or args.is_tensor(slot_mappings):
            slot_mappings = [slot_mappings]
        if not isinstance(slot_mappings, (list, tuple)):
            raise TaskError("launch: slot_mappings must be an array of engine slots or a list of them, one per "
                            f"task; got {type(slot_mappings).__name__}")
        if len(slot_mappings) != len(ids):
            raise TaskError(f"launch: {len(ids)} task ids but {len(slot_mappings)} slot mappings")
        if any(self._book.is_batch(t) for t in ids):
            raise TaskError("launch: a batch id was launched already; launch the tasks of get_match / put_match")
        targets = [args.slot_target(s, self.tokens_per_block) for s in slot_mappings]
        if self._ranks is not None:
            self._ranks.launch(self._plane("launch"), ids, targets, self._layout, bool(layerwise_transfer),
                               int(counter_id))
        else:
            self._plane("launch").launch(ids, targets, True, self._layout, bool(layerwise_transfer))
        kinds = {self._kinds.pop(t, None) for t in ids}
        for listener in list(self._launch_listeners):
            try:
                listener(ids, bool(layerwise_transfer), int(counter_id))
            except Exception:  # a listener's failure is its own; the copies are already queued
                logger.exception("FlexKV: a launch listener failed")
        if as_batch and (len(ids) > 1 or layerwise_transfer) and len(kinds) == 1 and kinds <= {"get", "put"}:
            return [self._book.merge(ids)]
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
        task_id, mask = match(tokens, mask_in, namespace=namespace)
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
        if self._remote is not None:
            self._remote.put_ended(int(task_id), bool(ok))

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
        ids, timeout = args.task_ids(task_ids), max(0.0, float(timeout))
        plane_ids, jobs = self._remote.split(ids) if self._remote is not None else (ids, [])
        ask, peek, known = self._book.plan(plane_ids)
        start = time.monotonic()
        reports = {}
        if ask:
            raw = self._tasks().wait(ask, timeout, bool(completely))
            if self._remote is not None:
                self._remote.reported(raw)
            reports = args.responses(raw, self.tokens_per_block)
        if peek:
            raw = self._tasks().try_wait(peek)
            if self._remote is not None:
                self._remote.reported(raw)
            reports.update(args.responses(raw, self.tokens_per_block))
        if jobs:
            left = max(0.0, timeout - (time.monotonic() - start))
            reports.update(args.responses(self._remote.reports(jobs, left), self.tokens_per_block))
        return self._book.settle(ids, reports, known, KVResponseStatus.TIMEOUT, leave_out_running=False)

    def try_wait(self, task_ids: int | Iterable[int]) -> dict[int, KVResponse]:
        """Like wait(timeout=0) but leaves out tasks that are still running."""
        ids = args.task_ids(task_ids)
        plane_ids, jobs = self._remote.split(ids) if self._remote is not None else (ids, [])
        ask, peek, known = self._book.plan(plane_ids)
        ask += peek
        reports = {}
        if ask:
            raw = self._tasks().try_wait(ask)
            if self._remote is not None:
                self._remote.reported(raw)
            reports = args.responses(raw, self.tokens_per_block)
        if jobs:
            reports.update(args.responses(self._remote.reports(jobs, None), self.tokens_per_block))
        return self._book.settle(ids, reports, known, KVResponseStatus.TIMEOUT, leave_out_running=True)

    def wait_layer(self, task_id: int, layer: int, stream: Any = None, timeout: float = 20.0) -> bool:
        """Waits until ``layer`` of a launched get is in the engine's KV memory (with ``stream``, a
        torch.cuda.Stream or cudaStream_t, makes the stream wait instead). False if the task ended without
        completing or ``timeout`` s passed. Layers arrive one by one for a layer-wise launch on the GPU."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or \
                not 0 <= int(layer) < self.model_config.num_layers:
            raise TaskError(f"wait_layer: layer must be an int in [0, {self.model_config.num_layers}), got {layer!r}")
        handle = None if stream is None else args.stream_handle(stream)
        subs = self._book.batch_tasks(int(task_id)) or [int(task_id)]
        return all([bool(self._plane().wait_layer(t, int(layer), handle, max(0.0, float(timeout)))) for t in subs])

    def cancel(self, task_ids: int | Iterable[int]) -> None:
        """Cancels tasks not yet launched and unlocks their blocks. Running tasks finish normally."""
        ids = []
        for t in args.task_ids(task_ids):
            ids.extend(self._book.batch_tasks(t) or [t])
        if self._remote is not None:
            ids, _ = self._remote.split(ids)  # a remote prefetch runs to its end
        self._plane().cancel(ids)

    def reset(self, timeout: float = 60.0) -> None:
        """Drops every cached block from every tier's index (and zeroes the header of every SSD slot written,
        so a restart does not bring them back: a reset after a weight update stays a reset), as the
        original FlexKV's reset: tasks of this manager still pending end CANCELLED (a wait reports them so). Here
        the copies already running are let finish first (up to ``timeout`` s), so no copy lands in a block
        that is given out again; tasks not launched yet are cancelled at once. Cheap when nothing is cached."""
        cp = self._plane("reset")
        pending = self._book.live()
        if pending:
            logger.warning("FlexKV: reset while %d task(s) are pending; they end CANCELLED", len(pending))
            cp.cancel(pending)
            reports = args.responses(cp.wait(pending, max(0.0, float(timeout)), True), self.tokens_per_block)
            running = [t for t, r in reports.items() if r.status is KVResponseStatus.TIMEOUT]
            self._book.keep(reports, None if running else "the cache was reset")
            if running:
                raise TaskError(f"reset: the copies of tasks {running[:8]} still run after {timeout} s; "
                                "nothing was reset")
        if hasattr(cp, "flush"):  # the write-throughs of puts reported earlier (a server flushes on its own)
            cp.flush(max(0.0, float(timeout)))
        cp.reset()

    def cache_stats(self) -> dict[str, Any]:
        """The control plane's counters (blocks, and tokens under FlexKV's names) and its indexes' state."""
        cp = self._plane()
        out: dict[str, Any] = dict(cp.counters())
        for name in _TOKEN_COUNTERS:
            out[f"{name}_tokens"] = out[f"{name}_blocks"] * self.tokens_per_block
        out["hit_rate"] = out["get_hit_blocks"] / out["get_query_blocks"] if out["get_query_blocks"] else 0.0
        out.update(cp.index_counts())
        if self._remote is not None:
            out["remote"] = {"capacity": self._remote.tier.settings.num_blocks,
                             "num_cached": self._remote.tier.index_size()}
        return out

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters, latency histograms, queue depths and index state in one read (core/metrics.py)."""
        return plane_snapshot(self._plane())

    @property
    def metrics_port(self) -> int | None:
        """The port of the Prometheus endpoint this manager opened (config metrics_port), or None."""
        obs = self._observers
        return obs.metrics.port if obs is not None and obs.metrics is not None else None

    def flush_remote(self, timeout: float = 20.0) -> bool:
        """Waits until the write-throughs to the remote tier queued so far ended; False on timeout (or
        True at once without a remote tier)."""
        return self._remote is None or self._remote.tier.flush(max(0.0, float(timeout)))

    # -------------------------------------------------------------- internals

    def _tasks(self) -> Any:
        """The control plane whose tasks wait() reports: also once it is shut down."""
        if self._cp is None:
            raise TaskError("KVManager is not started; call start() first")
        return self._cp

    def _track(self, task: int, kind: str) -> None:
        self._kinds[int(task)] = kind
        if len(self._kinds) > 4096:  # tasks matched and never launched (ended by cancel or by another facade)
            for t in list(self._kinds)[:2048]:
                self._kinds.pop(t, None)
        self._book.add(task, self._known)

    def _known(self, task: int) -> bool:
        cp = self._cp
        if cp is None or cp.closed:
            return False
        return not hasattr(cp, "inspect") or cp.inspect(int(task)) is not None

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

    def _run_of(self, tokens: np.ndarray, namespace: Namespace, block_hashes: Any) -> Callable[[int], Any]:
        """n -> the run of the first n blocks (the remote tier promotes a request's blocks up to n)."""
        hashes = None if block_hashes is None else args.hashes_array(block_hashes)

        def run_of(n: int) -> Any:
            part = None if hashes is None else hashes[:n]
            return self._run(tokens[: n * self.tokens_per_block], namespace, part)
        return run_of

    def _chain(self, tokens: np.ndarray, namespace: Namespace, block_hashes: Any, chain: KeyChain | None) -> KeyChain:
        if chain is not None:
            return chain
        hashes = None if block_hashes is None else args.hashes_array(block_hashes)
        return KeyChain(self._run(tokens, namespace, hashes), hashes, namespace)

    def _run(self, tokens: np.ndarray, namespace: Namespace, block_hashes: Any) -> Any:
        cp = self._plane()
        seed = self._seed(namespace)
        if block_hashes is None:
            return cp.token_run(seed, tokens)
        return cp.hash_run(seed, args.hashes_array(block_hashes), tokens)
