"""The worker connector (TensorRT-LLM's ``KvCacheConnectorWorker``, every rank).

TensorRT-LLM 1.2 calls ``register_kv_caches(pool)`` once at executor start with its primary KV pool, then
per iteration: ``start_load_kv(stream)`` after binding the scheduler's metadata, ``wait_for_layer_load``
before and ``save_kv_layer`` after each decoder layer (forward hooks), ``wait_for_save(stream)`` after
the forward pass, and ``get_finished(...)`` every iteration, even one without a batch.

Loads and stores are started by the scheduler connector on FlexKV's own streams; the worker makes the
engine's stream wait for each loaded layer and reports finished stores and asynchronous loads. With tensor
parallelism each rank waits for its own slice of a load (its RankAgent); only rank 0 holds the tasks, so
the other ranks report what they are given at once: TensorRT-LLM ends a request's transfer when every rank
has reported it, and rank 0 reports it only once every rank's copy is done (the task ends then).
"""

from __future__ import annotations

import logging
from typing import Any

from flexkv.core import KVResponseStatus

from .base import WorkerBase
from .config import settings_from_llm_args
from .metadata import FlexKVConnectorMetadata
from .session import Session, session_for

logger = logging.getLogger("flexkv")


class FlexKVWorkerConnector(WorkerBase):  # type: ignore[misc, valid-type]
    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.session: Session = session_for(llm_args, settings_from_llm_args(llm_args))
        self.layer_loads: list[tuple[int, int]] = []  # sync loads of the current forward pass
        self.unreported: dict[int, int] = {}  # task -> request: sync loads whose outcome is not collected
        self.pending_saves: set[int] = set()
        self.pending_loads: set[int] = set()
        self.load_failures = 0

    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self.session.start(kv_cache_tensor)

    def start_load_kv(self, stream: Any) -> None:
        meta = self._metadata
        if meta is not None and not isinstance(meta, FlexKVConnectorMetadata):
            raise TypeError(f"FlexKV's worker got connector metadata of type {type(meta).__name__}; the scheduler "
                            "and worker classes must both be FlexKV's")
        self.unreported.update((task, rid) for rid, task in self.layer_loads)  # hooks that missed a layer
        self.layer_loads = list(meta.sync_loads) if meta is not None else []
        self._metadata = None  # bound again before the next start_load_kv that has a batch

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        kv, agent = self.session.kv, self.session.agent
        if (kv is None and agent is None) or not self.layer_loads:
            return
        handle = stream if _is_cuda_stream(stream) else None
        for rid, task in self.layer_loads:
            try:
                if agent is not None:  # tensor parallelism: this rank's own slice of the load
                    arrived = agent.wait_task(task, layer_idx, None if handle is None else int(handle.cuda_stream))
                else:
                    arrived = kv.wait_layer(task, layer_idx, handle)
            except Exception as e:  # an unknown task: nothing of it can be waited for
                logger.error("FlexKV: waiting for layer %d of request %s failed: %s", layer_idx, rid, e)
                arrived = False
            if not arrived:
                self.load_failures += 1
                logger.error("FlexKV: layer %d of request %s's load did not arrive; its tokens are wrong",
                             layer_idx, rid)
        if layer_idx == self.session.num_layers - 1:
            self.unreported.update((task, rid) for rid, task in self.layer_loads)
            self.layer_loads = []

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        """Stores happen when a request finishes (``request_finished``), from blocks TensorRT-LLM keeps."""

    def wait_for_save(self, stream: Any) -> None:
        """Nothing to wait for: no store reads blocks the next forward pass writes."""

    def get_finished(self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int],
                     ) -> tuple[list[int], list[int]]:
        self._collect_sync_loads()
        self.pending_saves.update(int(r) for r in finished_gen_req_ids)
        self.pending_loads.update(int(r) for r in started_loading_req_ids)
        saved = self._finished(self.pending_saves, self.session.saving, "store")
        loaded = self._finished(self.pending_loads, self.session.loading, "load")
        return saved, loaded

    # ----------------------------------------------------------------------------------------- internals

    def _collect_sync_loads(self) -> None:
        """Collects the outcome of finished synchronous loads, so the control plane forgets them."""
        kv = self.session.kv
        if kv is None:  # a rank other than 0: the tasks' outcomes are rank 0's to collect
            self.unreported.clear()
            return
        if not self.unreported:
            return
        for task, response in kv.try_wait(list(self.unreported)).items():
            rid = self.unreported.pop(task)
            if response.status is not KVResponseStatus.SUCCESS:
                self.load_failures += 1
                logger.error("FlexKV: the load of request %s ended %s: %s", rid, response.status.value,
                             response.error)

    def _finished(self, pending: set[int], tasks: dict[int, int], what: str) -> list[int]:
        """The requests of `pending` whose task has ended (or that FlexKV never had a task for)."""
        kv = self.session.kv
        out = []
        with self.session.lock:
            owned = {rid: tasks.get(rid) for rid in pending}
        ended = kv.try_wait([t for t in owned.values() if t is not None]) if kv is not None else {}
        for rid, task in owned.items():
            if task is not None and task not in ended and kv is not None:
                continue
            response = ended.get(task) if task is not None else None
            if response is not None and response.status is not KVResponseStatus.SUCCESS:
                self.session.misses.count += 1
                level = logging.ERROR if what == "load" else logging.WARNING
                logger.log(level, "FlexKV: the %s of request %s ended %s: %s", what, rid, response.status.value,
                           response.error)
            out.append(rid)
        for rid in out:
            pending.discard(rid)
            with self.session.lock:
                tasks.pop(rid, None)
        return out


def _is_cuda_stream(stream: Any) -> bool:
    return stream is not None and type(stream).__module__.startswith("torch") and hasattr(stream, "cuda_stream")
