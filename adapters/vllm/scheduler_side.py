"""The scheduler-side connector: FlexKV's control plane (a KVManager) lives here, in vLLM's scheduler
process, and orders the copies that the workers make.

- Load: ``get_num_new_matched_tokens`` looks the prompt up without locking (``None`` while blocks come up
  from SSD or the remote tier) and answers that the load is asynchronous; ``update_state_after_alloc`` locks
  the blocks and orders the copy into the blocks vLLM allocated (in a later step, should some of them have to come up
  from SSD again: the scheduler thread never waits for the disk); the request waits until the worker
  reports it in ``finished_recving``, then its CPU blocks are unlocked.
- Store: ``request_finished`` reserves CPU blocks for the request's computed whole blocks that the cache
  lacks and orders their copy; vLLM keeps the blocks until the worker reports the request in
  ``finished_sending``; then the blocks become ready (and are written through to SSD).

A failure inside FlexKV never fails the engine: a lookup that raises is a miss, a store that raises is
skipped; both are logged and counted.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import numpy as np

from flexkv.core import FlexKVError, KVManager, Misses, RequestTasks, end_task, request_namespace

from .config import VllmSettings, model_config_for
from .metadata import CopyOrder, FlexKVConnectorMetadata

logger = logging.getLogger("flexkv")
_LIVE: weakref.WeakSet[SchedulerSide] = weakref.WeakSet()


def live_schedulers() -> list[SchedulerSide]:
    """The scheduler-side connectors of this process (their stats() are the connector's counters)."""
    return list(_LIVE)


def _token_array(request: Any, n: int | None = None) -> np.ndarray:
    ids = request.all_token_ids
    return np.asarray(ids[:n] if n is not None else ids, dtype=np.int64)


def _namespace(request: Any) -> tuple[str, ...]:
    lora = getattr(request, "lora_request", None)
    return request_namespace(cache_salt=getattr(request, "cache_salt", None),
                             lora=None if lora is None else getattr(lora, "lora_name", lora))


class SchedulerSide:
    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.block_size = settings.block_size
        model = model_config_for(settings)
        # vLLM's workers copy every block themselves (each its own heads): no rank dispatcher is needed.
        self.kv = KVManager(model, settings.cache_config, namespace=settings.model_name,
                            layout_tag=settings.layout_tag, external_copies=True)
        self.kv.start()
        self.matched: dict[str, int] = {}  # request -> the tokens vLLM had computed when it asked
        self.prefetches = RequestTasks(self.kv, "prefetch")  # SSD and remote promotions
        self.loads = RequestTasks(self.kv, "load")  # get tasks the workers are copying
        self.promoting: dict[str, tuple[int, list[int], range]] = {}  # request -> (get task, block ids, blocks)
        self.stores = RequestTasks(self.kv, "store")  # put tasks the workers are copying
        self.orders: list[CopyOrder] = []  # ordered since the last build_connector_meta
        # vLLM calls the scheduler side from its one scheduling thread: nothing here needs a lock.
        self.hit_tokens = 0
        self.stored_tokens = 0
        self.misses = Misses()
        _LIVE.add(self)

    # ---------------------------------------------------------------------------------------------- load

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        kv = self.kv
        try:
            tokens = _token_array(request)[: max(0, request.num_tokens - 1)]  # vLLM computes the last token
            ns = _namespace(request)
            cpu, ssd = kv.lookup(tokens, ns)
            if ssd > cpu and ssd > num_computed_tokens:
                task = self.prefetches.get(rid)
                if task is None:
                    task = kv.prefetch_async(tokens, ns)
                    self.prefetches.hold(rid, task)
                if task not in kv.try_wait(task):
                    return None, False  # blocks are coming up from SSD or remote: vLLM asks again later
                self.prefetches.pop(rid)
                cpu, _ = kv.lookup(tokens, ns)
        except Exception as e:  # a lookup that fails is a miss
            self.prefetches.pop(rid)
            self.misses.failed("lookup", rid, e)
            return 0, False
        external = max(0, cpu - num_computed_tokens)
        if external == 0:
            return 0, False
        self.matched[rid] = num_computed_tokens
        return external, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        start = self.matched.pop(rid, None)
        if num_external_tokens <= 0 or start is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        bs = self.block_size
        end = start + num_external_tokens
        wanted = range(start // bs, end // bs)
        task = None
        try:
            tokens = _token_array(request, end)
            mask = np.zeros(end, dtype=bool)
            mask[start:] = True
            tier = self.kv.tier_info()
            task, _ = self.kv.get_match(tokens, mask, namespace=_namespace(request))
            taken = self.kv.try_take_external(task)
            if taken is None:  # some blocks come up from SSD again: ordered in a later step
                self.promoting[rid] = (task, block_ids, wanted, tier)
                return
            self.orders.append(self._load_order(rid, task, block_ids, wanted, tier, *taken))
        except Exception as e:  # nothing loads: the worker reports every promised block as failed
            self.loads.pop(rid)
            self.misses.failed("load", rid, e)
            end_task(self.kv, task)
            self._give_up(rid, block_ids, wanted)

    def _load_order(self, rid: str, task: int, block_ids: list[int], wanted: range, tier: dict[str, Any],
                    seq_blocks: np.ndarray, host_ids: np.ndarray) -> CopyOrder:
        self.loads.hold(rid, task)
        self._same_tier(tier)
        ids = np.asarray(block_ids, dtype=np.int64)
        engine = ids[np.asarray(seq_blocks, dtype=np.int64)]
        promised = ids[wanted.start:wanted.stop]
        order = CopyOrder(rid, engine.tolist(), host_ids.tolist(),
                          error_blocks=promised[~np.isin(promised, engine)].tolist(), tier=tier)
        self.hit_tokens += len(engine) * self.block_size
        if order.error_blocks:
            self.misses.count += 1
            logger.warning("FlexKV: request %s: %d of %d promised blocks are gone; vLLM recomputes them", rid,
                           len(order.error_blocks), len(wanted))
        return order

    def _give_up(self, rid: str, block_ids: list[int], wanted: range) -> None:
        """Orders nothing but reports every promised block as failed: vLLM recomputes them."""
        self.misses.count += 1
        self.orders.append(CopyOrder(rid, [], [], error_blocks=list(block_ids[wanted.start:wanted.stop])))

    def _order_promoted_loads(self) -> None:
        for rid, (task, block_ids, wanted, tier) in list(self.promoting.items()):
            try:
                taken = self.kv.try_take_external(task)
                if taken is None:
                    continue
                del self.promoting[rid]
                self.orders.append(self._load_order(rid, task, block_ids, wanted, tier, *taken))
            except Exception as e:
                self.promoting.pop(rid, None)
                self.loads.pop(rid)
                self.misses.failed("load", rid, e)
                end_task(self.kv, task)
                self._give_up(rid, block_ids, wanted)

    # --------------------------------------------------------------------------------------------- store

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self.matched.pop(rid, None)
        self.prefetches.pop(rid)
        waiting = self.promoting.pop(rid, None)
        if waiting is not None:  # never ordered: its blocks go back once its SSD reads end
            end_task(self.kv, waiting[0])
        bs = self.block_size
        n = min(request.num_computed_tokens, len(block_ids) * bs) // bs * bs
        if n == 0:
            return False, None
        task = None
        try:
            tier = self.kv.tier_info()
            task, _ = self.kv.put_match(_token_array(request, n), namespace=_namespace(request))
            seq_blocks, host_ids = self.kv.take_external(task)
            if len(seq_blocks) == 0:
                self.kv.finish_external(task, True)
                return False, None
            self._same_tier(tier)
            sources = np.asarray(block_ids, dtype=np.int64)[np.asarray(seq_blocks, dtype=np.int64)]
            order = CopyOrder(rid, sources.tolist(), host_ids.tolist(), store=True, tier=tier)
        except Exception as e:
            self.misses.failed("store", rid, e)
            end_task(self.kv, task)
            return False, None
        self.stores.hold(rid, task)
        self.stored_tokens += len(order.engine_blocks) * bs
        self.orders.append(order)
        return True, None

    # ------------------------------------------------------------------------------------------ per step

    def build_connector_meta(self, scheduler_output: Any) -> FlexKVConnectorMetadata:
        self._order_promoted_loads()
        orders, self.orders = self.orders, []
        return FlexKVConnectorMetadata(orders=orders)

    def update_connector_output(self, connector_output: Any) -> None:
        """Ends the tasks whose copies every worker reports done (vLLM counts the workers' reports). A task
        that cannot be ended (the server is gone) is the server's to end: its lease runs out, its store never
        becomes readable."""
        for what, tasks, rids in (("load", self.loads, getattr(connector_output, "finished_recving", None)),
                                  ("store", self.stores, getattr(connector_output, "finished_sending", None))):
            for rid in rids or ():
                task = tasks.pop(rid)
                if task is None:
                    continue
                try:
                    self.kv.finish_external(task, True)
                except Exception as e:
                    self.misses.failed(f"{what} completion", rid, e)

    def _same_tier(self, tier: dict[str, Any]) -> None:
        """Raises if the control plane's CPU tier changed while a task was being taken (a `flexkv serve` that
        restarted in between): its block ids would name another tier's blocks."""
        if self.kv.tier_info() != tier:
            raise FlexKVError("the FlexKV server restarted while the request's blocks were being matched")

    def reset_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache(reset_connector=True)`` (after a weight update): drops every cached block,
        so no later request hits KV of the old weights. False (vLLM reports the reset failed) while workers
        still copy blocks of this connector's requests."""
        busy = len(self.loads) + len(self.stores) + len(self.promoting)
        if busy:
            logger.warning("FlexKV: reset_cache refused: %d request(s) still copy blocks; retry when idle", busy)
            return False
        for rid, task in self.prefetches.items():  # promotions from SSD: their blocks are about to go
            self.prefetches.pop(rid)
            end_task(self.kv, task)
        self.matched.clear()
        self.kv.reset()
        return True

    def shutdown(self) -> None:
        try:
            self.kv.shutdown()
        except Exception as e:  # the engine is stopping: a server that is gone must not fail that
            logger.warning("FlexKV: shutting the connector's manager down failed: %s", e)

    def stats(self) -> dict[str, Any]:
        out = {"hit_tokens": self.hit_tokens, "stored_tokens": self.stored_tokens, "failures": self.misses.count}
        try:
            out.update({k: v for k, v in self.kv.cache_stats().items() if k.startswith(("ssd_", "remote_"))})
        except Exception as e:  # a server that is gone has no counters to give
            logger.warning("FlexKV: the control plane's counters are unavailable: %s", e)
        return out
