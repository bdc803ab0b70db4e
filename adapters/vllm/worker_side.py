"""The worker-side connector: copies blocks between this worker's KV memory and FlexKV's CPU tier, as
the scheduler-side connector orders them in each step's metadata, and reports them done.

- Loads, asynchronous mode: queued in ``start_load_kv`` (after the forward is launched); the request waits
  (``WAITING_FOR_REMOTE_KVS``) until ``get_finished`` reports it in ``finished_recving``; blocks that could not
  be delivered are reported by ``get_block_ids_with_load_errors`` no later than that, and vLLM recomputes them
  (``kv_load_failure_policy: recompute``). In a step without a forward (nothing to compute but requests
  waiting for their loads) ``get_finished`` waits up to NO_FORWARD_LOAD_WAIT_S for that step's loads, so
  vLLM schedules those requests a step or two sooner instead of spinning through empty steps.
- Loads, layer-wise mode: queued in ``start_load_kv`` before the forward, one copy per layer;
  ``wait_for_layer_load`` waits for its own layer only.
- Stores: queued in ``wait_for_save``, after the step's forward, so they never delay it. Every order is
  reported done in the step's worker metadata (``build_connector_worker_meta``); a finished request that vLLM
  keeps for its stores is reported in ``finished_sending`` once they are done here. ``handle_preemptions``
  waits for the stores of the requests vLLM preempted before their blocks are overwritten.
- Shutdown: waits (a bounded time) for the copies in flight and records the stores no report carried for
  the scheduler, which keeps them (and writes them through to SSD).

With tensor parallelism every worker gets every order and copies its own heads of each block (its slice of
the host block); an order ends once every worker has reported it. With MLA every worker holds the whole
latent: all of them load it, worker 0 alone stores it.

Each order names its CPU tier (its socket): a restarted ``flexkv serve`` brings a new tier, which is mapped
beside the old one; the old one is unmapped once none of its copies is in flight. Copy jobs are therefore
named (tier socket, job id).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from flexkv.core import DataPlane

from .config import VllmSettings
from .kv_layout import layer_positions, layout_from_kv_caches
from .metadata import CopyOrder, FlexKVConnectorMetadata
from .worker_jobs import JobBook

logger = logging.getLogger("flexkv")
SHUTDOWN_DRAIN_S = 30.0  # the longest a worker's shutdown (or a preemption's flush) waits for copies in flight
NO_FORWARD_LOAD_WAIT_S = 0.005  # the longest get_finished waits for a step's loads when the step has no forward
_LIVE: weakref.WeakSet[WorkerSide] = weakref.WeakSet()


def live_workers() -> list[WorkerSide]:
    """The worker-side connectors of this process."""
    return list(_LIVE)


class WorkerSide:
    def __init__(self, settings: VllmSettings, vllm_config: Any) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.layout: Any = None
        self.tp_rank = 0
        self.layer_of: dict[str, int] = {}  # vLLM layer name -> its layer group in the layout
        self.planes: dict[str, DataPlane] = {}  # CPU tier socket -> the data plane onto it (the newest last)
        self.plane_errors: dict[str, str] = {}  # CPU tier socket -> why it cannot be mapped
        self.book = JobBook()
        self.layer_jobs: list[tuple[DataPlane, Any]] = []  # this step's layer-wise loads (DataPlane.LayerJobs)
        self.idle_step_loads: list[int] = []  # load orders of this step when it has no forward
        self.receipts = ""
        self.closed = False
        self.layer_loads = 0  # loads copied layer by layer inside a forward
        self.layer_waits = 0  # waits of an attention layer for its layer of them
        _LIVE.add(self)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        num_blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        tp = 1 if self.settings.use_mla else self.settings.tp_size
        if self.settings.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            self.tp_rank = int(get_tensor_model_parallel_rank())
        self.layout, tag, num_layers = layout_from_kv_caches(kv_caches, num_blocks, tp, 0 if tp == 1 else self.tp_rank)
        self.layer_of = layer_positions(kv_caches)
        logger.info("FlexKV: worker %d/%d registered %d layers x %d blocks (%s), %d bytes of each %d-byte block",
                    self.tp_rank, self.settings.tp_size, num_layers, self.layout.num_blocks, tag,
                    self.layout.block_bytes // tp, self.layout.block_bytes)

    def start_load_kv(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's loads (layer-wise ones before the forward, as vLLM calls this then)."""
        self.layer_jobs = []
        if metadata is None:
            return
        self.receipts = metadata.receipts or self.receipts
        self.book.awaiting.update(metadata.awaiting)
        for order in metadata.orders:  # queued in wait_for_save, which vLLM may call after get_finished
            if order.store:
                self.book.expect(order)
        loads = [o for o in metadata.orders if not o.store]
        self._submit(loads)
        self.idle_step_loads = [o.order_id for o in loads if not o.sync] if metadata.no_forward else []

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self.layer_jobs:
            return
        layer = self.layer_of.get(layer_name)
        self.layer_waits += 1
        for plane, jobs in self.layer_jobs:
            try:  # a layer FlexKV does not know waits for the whole copy
                plane.wait_layer_jobs(jobs, int(jobs.groups[-1]) if layer is None else layer)
            except Exception as e:  # the job's failure is reported by poll: its blocks are recomputed
                logger.warning("FlexKV: waiting for layer %s failed: %s", layer_name, e)

    def wait_for_save(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's stores: vLLM calls this after the step's forward."""
        self.layer_jobs = []
        if metadata is None:
            return
        stores = [o for o in metadata.orders if o.store]
        ordered: set[str] = set()
        for order in stores:  # the forward just launched writes the blocks these copy (a GPU runs it async)
            socket = _socket(order)
            plane = self._plane(order.tier) if order.engine_blocks and socket not in ordered else None
            if plane is None:
                continue
            ordered.add(socket)
            try:
                plane.after_current_stream()
            except Exception as e:
                logger.warning("FlexKV: cannot order stores after the forward (%s); they are skipped", e)
                for skipped in stores:
                    self.book.started(skipped, [])
                    self.book.order_done(skipped, str(e))
                return
        self._submit(stores)

    def handle_preemptions(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Waits for the stores of preempted requests: vLLM may overwrite their blocks in this step."""
        if metadata is None or not metadata.flush:
            return
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while self.book.jobs_of(metadata.flush) and time.monotonic() < deadline:
            self._collect(100_000)
        if self.book.jobs_of(metadata.flush):  # what they copy may be overwritten now: never make it readable
            self.book.abandon(metadata.flush, f"still running {SHUTDOWN_DRAIN_S:.0f} s after its request was preempted")

    def stats(self) -> dict[str, int]:
        return {"layer_loads": self.layer_loads, "layer_waits": self.layer_waits}

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.idle_step_loads:  # the engine has nothing to compute: reported now, they run in the next step
            deadline = time.monotonic() + NO_FORWARD_LOAD_WAIT_S
            while self.book.jobs_of(self.idle_step_loads) and (left := deadline - time.monotonic()) > 0:
                self._collect(max(1, int(left * 1e6)))
            self.idle_step_loads = []
        self._collect(0)
        sending = self.book.finished_sending(finished_req_ids)
        recving, self.book.recved = self.book.recved, set()
        return sending or None, recving or None

    def build_connector_worker_meta(self) -> Any:
        return self.book.take_report()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self.book.load_errors = self.book.load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Waits (at most SHUTDOWN_DRAIN_S) for the copies in flight, records the stores no report carried
        for the scheduler, then unmaps the CPU tiers."""
        if self.closed:
            return
        self.closed = True
        if not self.planes:
            return
        self._drain(SHUTDOWN_DRAIN_S)
        self.book.write_receipts(self.receipts)
        if self.book:
            logger.warning("FlexKV: copies still running after %.0f s at shutdown; their stores are dropped",
                           SHUTDOWN_DRAIN_S)
            return  # the CPU tiers stay mapped: a copy still writes into them
        for plane in self.planes.values():
            plane.close()
        self.planes.clear()

    def before_device_sleep(self) -> int:
        """vLLM's sleep mode is about to release the KV memory: waits (at most SHUTDOWN_DRAIN_S) for the copies
        in flight; returns how many there were."""
        waited = len(self.book)
        self._drain(SHUTDOWN_DRAIN_S)
        return waited

    def after_device_wake(self) -> None:
        """The KV memory is back (at the addresses it had: vLLM's sleep mode keeps them); copies resume."""
        if self.layout is None:
            raise RuntimeError("FlexKV: KV caches were not registered before the device slept")

    def _submit(self, orders: list[CopyOrder]) -> None:
        for order in orders:
            if not order.store:
                self.book.load_errors.update(order.error_blocks)
            if not order.engine_blocks or (order.store and self.settings.use_mla and self.tp_rank != 0):
                # nothing to copy here (MLA: worker 0 stores the latent every worker holds)
                self.book.started(order, [])
                self.book.order_done(order, "")
                continue
            socket = _socket(order)
            plane = self._plane(order.tier)
            if plane is None:
                self.book.started(order, [])
                self.book.order_done(order, self.plane_errors.get(socket, "no CPU tier"))
                continue
            try:
                if order.sync:
                    jobs = plane.submit_layers("host_to_engine", order.engine_blocks, order.host_blocks)
                    self.layer_jobs.append((plane, jobs))
                    self.layer_loads += 1
                    job_ids = sorted(set(jobs.jobs))
                else:
                    job_ids = [plane.submit("engine_to_host" if order.store else "host_to_engine",
                                            order.engine_blocks, order.host_blocks, urgent=not order.store)]
            except Exception as e:  # never leave the request waiting: report it, with its blocks as errors
                self.book.started(order, [])
                self.book.order_done(order, str(e))
                continue
            self.book.started(order, [(socket, job) for job in job_ids])

    def _collect(self, timeout_us: int) -> None:
        busy = self.book.sockets()
        for socket, plane in list(self.planes.items()):
            if socket in busy:
                for job, error in plane.poll(timeout_us):
                    self.book.job_done((socket, job), error)
        self._close_old_planes()

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.book and time.monotonic() < deadline:
            self._collect(100_000)

    def _plane(self, tier: dict[str, Any]) -> DataPlane | None:
        """The data plane onto the CPU tier ``tier``, mapped on its first order (the scheduler starts after the
        workers have registered their KV memory). A restarted `flexkv serve` brings a new tier: it is mapped,
        and the old one unmapped once its copies in flight are done."""
        socket = str(tier.get("socket", ""))
        plane = self.planes.get(socket)
        if plane is not None or socket in self.plane_errors:
            return plane
        try:
            if self.layout is None:
                raise RuntimeError("vLLM has not registered its KV caches with the connector")
            if not socket:
                raise RuntimeError("the scheduler named no CPU tier")
            plane = DataPlane(tier, self.layout, self.settings.cache_config)
        except Exception as e:
            self.plane_errors[socket] = f"the worker cannot reach FlexKV's CPU tier: {e}"
            logger.error("FlexKV: %s; worker %d recomputes what that tier's orders would load",
                         self.plane_errors[socket], self.tp_rank)
            return None
        self.planes[socket] = plane
        logger.info("FlexKV: worker %d mapped the CPU tier from %s", self.tp_rank, socket)
        self._close_old_planes()
        return plane

    def _close_old_planes(self) -> None:
        """Unmaps every tier but the newest once no copy of it is in flight (a server that restarted)."""
        if len(self.planes) < 2:
            return
        busy = self.book.sockets()
        for socket in list(self.planes)[:-1]:
            if socket not in busy:
                self.planes.pop(socket).close()
                logger.info("FlexKV: worker %d unmapped the CPU tier of %s (a newer one replaced it)", self.tp_rank,
                            socket)


def _socket(order: CopyOrder) -> str:
    return str(order.tier.get("socket", ""))
