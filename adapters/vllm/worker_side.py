"""The worker-side connector: copies blocks between this worker's KV memory and FlexKV's CPU tier, as
the scheduler-side connector orders them in each step's metadata, and reports them done.

- Loads, asynchronous mode: queued in ``start_load_kv`` (after the forward is launched); the request waits
  (``WAITING_FOR_REMOTE_KVS``) until ``get_finished`` reports it in ``finished_recving``; blocks that could not
  be delivered are reported by ``get_block_ids_with_load_errors`` no later than that, and vLLM recomputes them
  (``kv_load_failure_policy: recompute``).
- Loads, layer-wise mode: queued in ``start_load_kv`` before the forward, one copy per layer;
  ``wait_for_layer_load`` waits for its own layer only.
- Stores: queued in ``wait_for_save``, after the step's forward, so they never delay it. Every order is
  reported done in the step's worker metadata (``build_connector_worker_meta``); a finished request that vLLM
  keeps for its stores is reported in ``finished_sending`` once they are done here. ``handle_preemptions``
  waits for the stores of the requests vLLM preempted before their blocks are overwritten.
- Shutdown: waits (a bounded time) for the copies in flight and records the stores no report carried for
  the scheduler, which keeps them (and writes them through to SSD).
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
SHUTDOWN_DRAIN_S = 30.0  # the longest a worker's shutdown waits for copies in flight
_LIVE: weakref.WeakSet[WorkerSide] = weakref.WeakSet()


def live_workers() -> list[WorkerSide]:
    """The worker-side connectors of this process."""
    return list(_LIVE)


class WorkerSide:
    def __init__(self, settings: VllmSettings, vllm_config: Any) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.layout: Any = None
        self.layer_of: dict[str, int] = {}  # vLLM layer name -> its layer group in the layout
        self.plane: DataPlane | None = None
        self.plane_error: str | None = None
        self.book = JobBook()
        self.layer_jobs: list[Any] = []  # this step's layer-wise loads (DataPlane.LayerJobs)
        self.receipts = ""
        self.tier: dict[str, Any] = {}
        self.closed = False
        self.layer_loads = 0  # loads copied layer by layer inside a forward
        self.layer_waits = 0  # waits of an attention layer for its layer of them
        _LIVE.add(self)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        num_blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        self.layout, tag, num_layers = layout_from_kv_caches(kv_caches, num_blocks)
        self.layer_of = layer_positions(kv_caches)
        logger.info("FlexKV: worker registered %d layers x %d blocks (%s), %d bytes per block", num_layers,
                    self.layout.num_blocks, tag, self.layout.block_bytes)

    def start_load_kv(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's loads (layer-wise ones before the forward, as vLLM calls this then)."""
        self.layer_jobs = []
        if metadata is None:
            return
        self.receipts, self.tier = metadata.receipts or self.receipts, metadata.tier or self.tier
        self.book.awaiting.update(metadata.awaiting)
        self._submit([o for o in metadata.orders if not o.store])

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self.layer_jobs or self.plane is None:
            return
        layer = self.layer_of.get(layer_name)
        self.layer_waits += 1
        for jobs in self.layer_jobs:
            try:  # a layer FlexKV does not know waits for the whole copy
                self.plane.wait_layer(jobs, int(jobs.groups[-1]) if layer is None else layer)
            except Exception as e:  # the job's failure is reported by poll: its blocks are recomputed
                logger.warning("FlexKV: waiting for layer %s failed: %s", layer_name, e)

    def wait_for_save(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's stores: vLLM calls this after the step's forward."""
        self.layer_jobs = []
        if metadata is None:
            return
        self.tier = metadata.tier or self.tier
        stores = [o for o in metadata.orders if o.store]
        plane = self._plane(self.tier) if stores else None
        if plane is not None:
            try:  # the forward just launched writes the blocks these copy (a GPU runs it asynchronously)
                plane.after_current_stream()
            except Exception as e:
                logger.warning("FlexKV: cannot order stores after the forward (%s); they are skipped", e)
                for order in stores:
                    self.book.started(order, [])
                    self.book.order_done(order, str(e))
                return
        self._submit(stores)

    def handle_preemptions(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Waits for the stores of preempted requests: vLLM may overwrite their blocks in this step."""
        if metadata is None or not metadata.flush or self.plane is None:
            return
        deadline = time.monotonic() + SHUTDOWN_DRAIN_S
        while self.book.jobs_of(metadata.flush) and time.monotonic() < deadline:
            self._collect(100_000)
        if self.book.jobs_of(metadata.flush):  # what they copy may be overwritten now: never make it readable
            self.book.abandon(metadata.flush, f"still running {SHUTDOWN_DRAIN_S:.0f} s after its request was preempted")

    def stats(self) -> dict[str, int]:
        return {"layer_loads": self.layer_loads, "layer_waits": self.layer_waits}

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
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
        for the scheduler, then unmaps the CPU tier."""
        if self.closed:
            return
        self.closed = True
        if self.plane is None:
            return
        self.book.drain(self.plane, SHUTDOWN_DRAIN_S)
        self.book.write_receipts(self.receipts)
        if self.book:
            logger.warning("FlexKV: copies still running after %.0f s at shutdown; their stores are dropped",
                           SHUTDOWN_DRAIN_S)
            return  # the CPU tier stays mapped: a copy still writes into it
        self.plane.close()
        self.plane = None

    def _submit(self, orders: list[CopyOrder]) -> None:
        if not orders:
            return
        plane = self._plane(self.tier)
        for order in orders:
            if not order.store:
                self.book.load_errors.update(order.error_blocks)
            if plane is None or not order.engine_blocks:
                self.book.started(order, [])
                self.book.order_done(order, self.plane_error if plane is None and order.engine_blocks else "")
                continue
            try:
                if order.sync:
                    jobs = plane.submit_layers("host_to_engine", order.engine_blocks, order.host_blocks)
                    self.layer_jobs.append(jobs)
                    self.layer_loads += 1
                    job_ids = sorted(set(jobs.jobs))
                else:
                    job_ids = [plane.submit("engine_to_host" if order.store else "host_to_engine",
                                            order.engine_blocks, order.host_blocks, urgent=not order.store)]
            except Exception as e:  # never leave the request waiting: report it, with its blocks as errors
                self.book.started(order, [])
                self.book.order_done(order, str(e))
                continue
            self.book.started(order, job_ids)

    def _collect(self, timeout_us: int) -> None:
        if self.plane is not None and self.book:
            for job, error in self.plane.poll(timeout_us):
                self.book.job_done(job, error)

    def _plane(self, tier: dict[str, Any]) -> DataPlane | None:
        """The data plane onto the scheduler's CPU tier, built on the first order (the scheduler starts
        after the workers have registered their KV memory)."""
        if self.plane is not None or self.plane_error is not None:
            return self.plane
        try:
            if self.layout is None:
                raise RuntimeError("vLLM has not registered its KV caches with the connector")
            self.plane = DataPlane(tier, self.layout, self.settings.cache_config)
            logger.info("FlexKV: worker mapped the CPU tier from %s", tier.get("socket"))
        except Exception as e:
            self.plane_error = f"the worker cannot reach FlexKV's CPU tier: {e}"
            logger.error("FlexKV: %s; FlexKV is off for this worker (every load is recomputed)",
                         self.plane_error)
            return None
        return self.plane
