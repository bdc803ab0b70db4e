"""The worker-side connector: copies blocks between this worker's KV memory and FlexKV's CPU tier, as
the scheduler-side connector orders them in each step's metadata, and reports them done.

Loads are asynchronous for vLLM: a request whose blocks are loading waits (``WAITING_FOR_REMOTE_KVS``)
until ``get_finished`` reports it in ``finished_recving``; blocks that could not be delivered are
reported by ``get_block_ids_with_load_errors`` no later than that, and vLLM recomputes them
(``kv_load_failure_policy: recompute``). A store is reported in ``finished_sending`` once its copy is
done, and vLLM frees its blocks then.
"""

from __future__ import annotations

import logging
from typing import Any

from flexkv.core import DataPlane

from .config import VllmSettings
from .kv_layout import layout_from_kv_caches
from .metadata import CopyOrder, FlexKVConnectorMetadata

logger = logging.getLogger("flexkv")


class WorkerSide:
    def __init__(self, settings: VllmSettings, vllm_config: Any) -> None:
        self.settings = settings
        self.vllm_config = vllm_config
        self.layout: Any = None
        self.plane: DataPlane | None = None
        self.plane_error: str | None = None
        self.jobs: dict[int, CopyOrder] = {}  # copy job -> its order
        self.recved: set[str] = set()  # loads done, to report
        self.sent: set[str] = set()  # stores done, to report once vLLM has said the request finished
        self.finished: set[str] = set()
        self.load_errors: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        num_blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        self.layout, tag, num_layers = layout_from_kv_caches(kv_caches, num_blocks)
        logger.info("FlexKV: worker registered %d layers x %d blocks (%s), %d bytes per block", num_layers,
                    self.layout.num_blocks, tag, self.layout.block_bytes)

    def start_load_kv(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's copies: loads ahead of stores."""
        if metadata is None or not metadata.orders:
            return
        plane = self._plane(metadata.tier)
        for order in sorted(metadata.orders, key=lambda o: o.store):
            if not order.store:
                self.load_errors.update(order.error_blocks)
            if plane is None or not order.engine_blocks:
                self._done(order, self.plane_error if plane is None and order.engine_blocks else "")
                continue
            try:
                job = plane.submit("engine_to_host" if order.store else "host_to_engine", order.engine_blocks,
                                   order.host_blocks, urgent=not order.store)
            except Exception as e:  # never leave the request waiting: report it, with its blocks as errors
                self._done(order, str(e))
                continue
            self.jobs[job] = order

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.finished.update(finished_req_ids)
        if self.plane is not None and self.jobs:
            for job, error in self.plane.poll():
                order = self.jobs.pop(job, None)
                if order is not None:
                    self._done(order, error)
        sending = {r for r in self.sent if r in self.finished}
        self.sent -= sending
        self.finished -= sending
        recving, self.recved = self.recved, set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Waits for the copies in flight, then unmaps the CPU tier."""
        if self.plane is None:
            return
        while self.jobs:
            for job, error in self.plane.poll(1_000_000):
                order = self.jobs.pop(job, None)
                if order is not None:
                    self._done(order, error)
        self.plane.close()
        self.plane = None

    def before_device_sleep(self) -> int:
        """vLLM's sleep mode is about to release the KV memory: waits for the copies in flight; returns how many
        there were."""
        waited = len(self.jobs)
        while self.plane is not None and self.jobs:
            for job, error in self.plane.poll(1_000_000):
                order = self.jobs.pop(job, None)
                if order is not None:
                    self._done(order, error)
        return waited

    def after_device_wake(self) -> None:
        """The KV memory is back (at the addresses it had: vLLM's sleep mode keeps them); copies resume."""
        if self.layout is None:
            raise RuntimeError("FlexKV: KV caches were not registered before the device slept")

    def _done(self, order: CopyOrder, error: str) -> None:
        if error:
            logger.warning("FlexKV: %s of request %s failed: %s", "store" if order.store else "load",
                           order.request_id, error)
            if not order.store:
                self.load_errors.update(order.engine_blocks)
        (self.sent if order.store else self.recved).add(order.request_id)

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
