"""The worker-side connector: copies blocks between this worker's KV memory and FlexKV's CPU tier, as
the scheduler-side connector orders them in each step's metadata, and reports them done.

Loads are asynchronous for vLLM: a request whose blocks are loading waits (``WAITING_FOR_REMOTE_KVS``)
until ``get_finished`` reports it in ``finished_recving``; blocks that could not be delivered are
reported by ``get_block_ids_with_load_errors`` no later than that, and vLLM recomputes them
(``kv_load_failure_policy: recompute``). A store is reported in ``finished_sending`` once its copy is
done, and vLLM frees its blocks then.

With tensor parallelism every worker gets every order and copies its own heads of each block (its slice
of the host block); vLLM counts a request done only once every worker has reported it. With MLA every
worker holds the whole latent: all of them load it, worker 0 alone stores it.
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
        self.tp_rank = 0
        self.planes: dict[str, DataPlane] = {}  # CPU tier socket -> the data plane onto it (the newest last)
        self.plane_errors: dict[str, str] = {}  # CPU tier socket -> why it cannot be mapped
        self.jobs: dict[tuple[str, int], CopyOrder] = {}  # (tier socket, copy job) -> its order
        self.recved: set[str] = set()  # loads done, to report
        self.sent: set[str] = set()  # stores done, to report once vLLM has said the request finished
        self.finished: set[str] = set()
        self.load_errors: set[int] = set()

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        num_blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        tp = 1 if self.settings.use_mla else self.settings.tp_size
        if self.settings.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank

            self.tp_rank = int(get_tensor_model_parallel_rank())
        self.layout, tag, num_layers = layout_from_kv_caches(kv_caches, num_blocks, tp, 0 if tp == 1 else self.tp_rank)
        logger.info("FlexKV: worker %d/%d registered %d layers x %d blocks (%s), %d bytes of each %d-byte block",
                    self.tp_rank, self.settings.tp_size, num_layers, self.layout.num_blocks, tag,
                    self.layout.block_bytes // tp, self.layout.block_bytes)

    def start_load_kv(self, metadata: FlexKVConnectorMetadata | None) -> None:
        """Queues this step's copies: loads ahead of stores."""
        if metadata is None or not metadata.orders:
            return
        for order in sorted(metadata.orders, key=lambda o: o.store):
            if not order.store:
                self.load_errors.update(order.error_blocks)
            if not order.engine_blocks or (order.store and self.settings.use_mla and self.tp_rank != 0):
                self._done(order, "")  # nothing to copy here (MLA: worker 0 stores the latent every worker holds)
                continue
            socket = str(order.tier.get("socket", ""))
            plane = self._plane(order.tier)
            if plane is None:
                self._done(order, self.plane_errors.get(socket, "no CPU tier"))
                continue
            try:
                job = plane.submit("engine_to_host" if order.store else "host_to_engine", order.engine_blocks,
                                   order.host_blocks, urgent=not order.store)
            except Exception as e:  # never leave the request waiting: report it, with its blocks as errors
                self._done(order, str(e))
                continue
            self.jobs[(socket, job)] = order

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.finished.update(finished_req_ids)
        if self.jobs:
            self._collect(0)
        sending = {r for r in self.sent if r in self.finished}
        self.sent -= sending
        self.finished -= sending
        recving, self.recved = self.recved, set()
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def shutdown(self) -> None:
        """Waits for the copies in flight, then unmaps the CPU tiers."""
        while self.jobs:
            self._collect(1_000_000)
        for plane in self.planes.values():
            plane.close()
        self.planes.clear()

    def _collect(self, timeout_us: int) -> None:
        for socket, plane in list(self.planes.items()):
            if not any(s == socket for s, _ in self.jobs):
                continue
            for job, error in plane.poll(timeout_us):
                order = self.jobs.pop((socket, job), None)
                if order is not None:
                    self._done(order, error)
        self._close_old_planes()

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
            logger.warning("FlexKV: %s of request %s failed on worker %d: %s", "store" if order.store else "load",
                           order.request_id, self.tp_rank, error)
            if not order.store:
                self.load_errors.update(order.engine_blocks)
        (self.sent if order.store else self.recved).add(order.request_id)

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
        for socket in list(self.planes)[:-1]:
            if not any(s == socket for s, _ in self.jobs):
                self.planes.pop(socket).close()
                logger.info("FlexKV: worker %d unmapped the CPU tier of %s (a newer one replaced it)", self.tp_rank,
                            socket)
