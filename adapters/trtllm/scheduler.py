"""The scheduler connector (TensorRT-LLM's ``KvCacheConnectorScheduler``, rank 0).

TensorRT-LLM 1.2 calls it from its executor loop (``py_executor.py`` and the C++ ``addSequence``):

- ``get_num_new_matched_tokens(request, num_computed_tokens)`` when a context request first gets its
  blocks, after the on-device prefix match: FlexKV locks its blocks for the next whole blocks of the
  prompt (never the last prompt token, which the engine must compute) and answers ``(tokens, async)``.
  The load is synchronous when every block is in the CPU tier, asynchronous when some come up from SSD.
- ``update_state_after_alloc(request, block_ids)`` right after: the copy into
  ``block_ids[computed/tpb : (computed+matched)/tpb]`` starts at once, on FlexKV's own streams.
- ``build_connector_meta(scheduler_output)`` hands the workers the synchronous loads the coming forward
  pass waits for, layer by layer (``wait_for_layer_load``). Asynchronous loads are reported by the
  worker's ``get_finished``; TensorRT-LLM schedules the request again once they are done.
- ``request_finished(request, cache_block_ids)`` when a request ends: the whole blocks of its computed
  tokens that FlexKV lacks are copied out; True asks TensorRT-LLM to keep the blocks until the worker
  reports the request in ``get_finished``.

A failure inside FlexKV never fails the executor: a lookup that raises is a miss, a store that raises is
skipped; both are logged and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexkv.core import end_task, request_namespace

from .base import SchedulerBase
from .config import settings_from_llm_args
from .metadata import FlexKVConnectorMetadata
from .session import Session, session_for

logger = logging.getLogger("flexkv")


@dataclass
class _PendingLoad:
    task: int
    start: int     # first token FlexKV loads (the tokens the engine already had)
    tokens: int    # how many
    is_async: bool


def _namespace(request: Any) -> tuple[str, ...]:
    return request_namespace(cache_salt=getattr(request, "cache_salt_id", None),
                             lora=getattr(request, "lora_task_id", None))


def _block_slots(block_ids: Any, tokens_per_block: int) -> np.ndarray:
    blocks = np.asarray(block_ids, dtype=np.int64)
    return (blocks[:, None] * tokens_per_block + np.arange(tokens_per_block, dtype=np.int64)).reshape(-1)


class FlexKVSchedulerConnector(SchedulerBase):  # type: ignore[misc, valid-type]
    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.settings = settings_from_llm_args(llm_args)
        self.tokens_per_block = self.settings.tokens_per_block
        self.session: Session = session_for(llm_args, self.settings)
        self.pending: dict[int, _PendingLoad] = {}  # matched, not yet allocated
        self.sync_loads: list[tuple[int, int]] = []  # launched since the last build_connector_meta
        self.hit_tokens = 0
        self.stored_tokens = 0

    # ------------------------------------------------------------------------------------------ load

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        kv = self.session.kv
        if kv is None or getattr(request, "is_dummy_request", False):
            return 0, False  # before register_kv_caches (warm-up) or a dummy request
        rid = int(request.request_id)
        tpb = self.tokens_per_block
        try:
            self._drop_pending(rid)
            prompt_len = int(request.prompt_len)
            # Whole blocks only, and at least one prompt token left for the engine to compute.
            limit = (prompt_len - 1) // tpb * tpb
            if num_computed_tokens % tpb or limit <= num_computed_tokens:
                return 0, False
            tokens = np.asarray(request.get_tokens(0)[:limit], dtype=np.int64)
            namespace = _namespace(request)
            cpu_tokens, _ = kv.lookup(tokens, namespace)
            mask = np.zeros(limit, dtype=bool)
            mask[num_computed_tokens:] = True
            task, loadable = kv.get_match(tokens, mask, namespace=namespace)
            matched = int(np.count_nonzero(loadable))
            if matched == 0:
                end_task(kv, task)
                return 0, False
            # Blocks past the CPU tier's prefix come up from SSD first: the load is asynchronous then.
            is_async = cpu_tokens < num_computed_tokens + matched
            self.pending[rid] = _PendingLoad(task, num_computed_tokens, matched, is_async)
            self.hit_tokens += matched
            return matched, is_async
        except Exception as e:
            self.session.misses.failed("lookup", rid, e)
            self._drop_pending(rid)
            return 0, False

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        rid = int(request.request_id)
        load = self.pending.pop(rid, None)
        kv = self.session.kv
        if load is None or kv is None:
            return
        tpb = self.tokens_per_block
        first, count = load.start // tpb, load.tokens // tpb
        blocks = list(block_ids)[first:first + count]
        try:
            if len(blocks) != count:
                raise ValueError(f"{len(block_ids)} block ids for a load of blocks {first}..{first + count - 1}")
            kv.launch(load.task, _block_slots(blocks, tpb), layerwise_transfer=not load.is_async)
        except Exception:
            # TensorRT-LLM was promised these tokens and has no way to recompute them now; fail loudly.
            self.session.misses.count += 1
            logger.exception("FlexKV: the load for request %s could not start", rid)
            end_task(kv, load.task)
            raise
        if load.is_async:
            with self.session.lock:
                self.session.loading[rid] = load.task
        else:
            self.sync_loads.append((rid, load.task))

    def build_connector_meta(self, scheduler_output: Any) -> FlexKVConnectorMetadata:
        meta = FlexKVConnectorMetadata(sync_loads=self.sync_loads)
        self.sync_loads = []
        return meta

    # ----------------------------------------------------------------------------------------- store

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        rid = int(request.request_id)
        self._drop_pending(rid)
        kv = self.session.kv
        if kv is None:
            return False
        tpb = self.tokens_per_block
        try:
            tokens = list(request.get_tokens(0))
            # The last token was sampled but never fed back: its KV does not exist.
            n_blocks = min((len(tokens) - 1) // tpb, len(cache_block_ids))
            if n_blocks <= 0:
                return False
            token_ids = np.asarray(tokens[: n_blocks * tpb], dtype=np.int64)
            task, mask = kv.put_match(token_ids, namespace=_namespace(request))
            new = np.flatnonzero(np.asarray(mask).reshape(-1, tpb)[:, 0])
            if len(new) == 0:
                end_task(kv, task)
                return False
            blocks = np.asarray(cache_block_ids[:n_blocks], dtype=np.int64)[new]
            kv.launch(task, _block_slots(blocks, tpb))
        except Exception as e:
            self.session.misses.failed("store", rid, e)
            return False
        with self.session.lock:
            self.session.saving[rid] = task
        self.stored_tokens += len(new) * tpb
        return True

    # ----------------------------------------------------------------------------------------- other

    def _drop_pending(self, rid: int) -> None:
        load = self.pending.pop(rid, None)
        if load is not None and self.session.kv is not None:
            end_task(self.session.kv, load.task)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hit_tokens": self.hit_tokens, "stored_tokens": self.stored_tokens,
                               "failures": self.session.misses.count}
        if self.session.kv is not None:
            out["cache"] = self.session.kv.cache_stats()
            out["metrics"] = self.session.kv.metrics_snapshot()  # latencies, queue depths (flexkv stats' numbers)
        return out
