"""The scheduler-side connector: FlexKV's control plane (a KVManager) lives here, in vLLM's scheduler
process, and orders the copies that the workers make.

- Load: ``get_num_new_matched_tokens`` looks the prompt up without locking (``None`` while blocks come up from
  SSD or the remote tier). In the default ``async`` load mode the load is asynchronous:
  ``update_state_after_alloc`` locks the blocks and orders the copy into the blocks vLLM allocated (in a later
  step, should some of them have to come up from SSD again: the scheduler thread never waits for the disk),
  and the request waits until the workers report it in ``finished_recving``, then its CPU blocks are unlocked.
  In ``layerwise`` mode the load is synchronous: the copy runs inside the step's forward, layer by layer, each
  attention layer waiting for its own layer only.
- Store, as blocks are computed: each step orders the copies of the blocks that this step's forward fills
  (prefill chunks included); the workers start them after the forward. ``request_finished`` orders only the
  tail, and vLLM keeps a finished request's blocks while any of its copies is in flight. When vLLM preempts
  a request, its copies in flight are waited for before its blocks can be overwritten (``flush``). With
  ``flexkv_store_mode: finished`` a request is stored only when it ends or is aborted: no copy runs while it is
  prefilled, and a preempted request's blocks are recomputed on resumption.
- Keys: a request's block keys are made once, from vLLM's own ``request.block_hashes`` salted by FlexKV's
  namespace (or from its token ids where vLLM's hashes differ between processes), and extended by the new
  blocks only.
- Each order names the CPU tier its host blocks belong to: a restarted ``flexkv serve`` has a new one, and an
  order of the old tier never touches the new one's blocks.

A failure inside FlexKV never fails the engine: a lookup that raises is a miss, a store that raises is
skipped; both are logged and counted.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from flexkv.core import FlexKVError, KVManager, Misses, RequestTasks, end_task, hashes_array, request_namespace

from .config import VllmSettings, model_config_for
from .metadata import CopyOrder, FlexKVConnectorMetadata
from .orders import OrderLedger

logger = logging.getLogger("flexkv")
_LIVE: weakref.WeakSet[SchedulerSide] = weakref.WeakSet()
_EMPTY_KEYS = np.zeros((0, 2), dtype=np.uint64)
_NO_TOKENS = np.zeros(0, dtype=np.int64)
_PREFETCH_TRIES = 8  # SSD promotions a lookup waits for before it takes what the CPU tier has
_NEVER = 1 << 62  # a request's stored-block count that no store reaches: it is never stored
_SILENT_WORKERS_S = 60.0  # with stores in flight and no report for this long, vLLM's engine may go idle


def live_schedulers() -> list[SchedulerSide]:
    """The scheduler-side connectors of this process (their stats() are the connector's counters)."""
    return list(_LIVE)


class _Request:
    """What the scheduler side keeps of one request between vLLM's calls."""

    __slots__ = ("request", "ns", "token_ids", "keys", "blocks", "computed", "stored", "lookup", "keyings", "hit")

    def __init__(self, request: Any, ns: tuple[str, ...]) -> None:
        self.request = request
        self.ns = ns
        self.token_ids = _NO_TOKENS  # the leading token ids converted so far (vLLM only appends to a request's)
        self.keys = _EMPTY_KEYS  # (n, 2) uint64: the request's leading block keys before FlexKV's salt
        self.blocks: list[int] = []  # vLLM's block table (the one KV cache group)
        self.computed = 0  # tokens computed before the step being built
        self.stored = 0  # leading blocks stored or ordered
        self.lookup: tuple[int, Any] | None = None  # (blocks, key chain) of the last lookup
        self.keyings = 0  # times the prompt's keys were made
        self.hit = False

    def tokens(self, n: int) -> np.ndarray:
        """The request's first n token ids (fewer if it has fewer), each converted from vLLM's list once."""
        have = len(self.token_ids)
        if n > have:
            more = np.asarray(self.request.all_token_ids[have:n], dtype=np.int64)
            self.token_ids = np.concatenate([self.token_ids, more]) if have else more
        return self.token_ids[:n]


class SchedulerSide:
    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self.block_size = settings.block_size
        self.layerwise = settings.load_mode == "layerwise"
        self.store_as_computed = settings.store_mode == "computed"
        self.hash_salt = settings.hash_salt
        model = model_config_for(settings)
        # vLLM's workers copy every block themselves (each its own heads): no rank dispatcher is needed.
        self.kv = KVManager(model, settings.cache_config, namespace=settings.model_name,
                            layout_tag=settings.layout_tag, external_copies=True)
        self.kv.start()
        # in a directory of its own (0700): no other user can plant order ids for the scheduler to keep
        receipts = os.path.join(tempfile.mkdtemp(prefix="flexkv-receipts-"), "receipts")
        self.ledger = OrderLedger(self.kv, settings.num_workers, receipts)
        self.reqs: dict[str, _Request] = {}
        self.matched: dict[str, int] = {}  # request -> the tokens vLLM had computed when it asked
        self.prefetches = RequestTasks(self.kv, "prefetch")  # SSD and remote promotions
        self.prefetch_tries: dict[str, int] = {}
        # request -> (get task, block ids, blocks, the CPU tier it was matched in)
        self.promoting: dict[str, tuple[int, list[int], range, dict[str, Any]]] = {}
        self.orders: list[CopyOrder] = []  # ordered since the last build_connector_meta
        self.awaiting: list[str] = []  # finished requests whose stores are in flight, for the next metadata
        # vLLM calls the scheduler side from its one scheduling thread: nothing here needs a lock.
        self.hit_tokens = 0
        self.stored_tokens = 0
        self.store_orders = 0  # copies ordered into FlexKV (one per request and step that completed blocks)
        self.resumed_hit_tokens = 0  # hits of requests vLLM had preempted
        self.preempted: set[str] = set()
        self.preemptions = 0
        self.flushed_orders = 0  # store orders the workers waited for before a preempted request's blocks went
        self.keyings = 0  # prompts keyed (each from vLLM's hashes or by hashing token ids)
        self.token_keyings = 0  # of those, by hashing token ids
        self.hit_requests = 0
        self.hit_request_keyings = 0
        self.misses = Misses()
        # called with (key chain, vLLM request) for every key chain made (kv_events.py learns vLLM's block ids so)
        self.chain_listeners: list[Callable[[Any, Any], None]] = []
        self._closed = False
        self._warned_silent = False
        _LIVE.add(self)

    # ---------------------------------------------------------------------------------------------- keys

    def _state(self, request: Any) -> _Request:
        rid = request.request_id
        st = self.reqs.get(rid)
        if st is None or st.request is not request:
            lora = getattr(request, "lora_request", None)
            ns = request_namespace(cache_salt=getattr(request, "cache_salt", None),
                                   lora=None if lora is None else getattr(lora, "lora_name", lora))
            if self.hash_salt is not None:
                ns = (*ns, self.hash_salt)
            st = self.reqs[rid] = _Request(request, ns)
        return st

    def _keys(self, st: _Request, n: int, counted: bool) -> np.ndarray:
        """The first n block keys of the request (fewer if vLLM has hashed fewer blocks); made once, extended
        by new blocks only. ``counted``: the keys of a lookup (the prompt), counted in the stats."""
        have = len(st.keys)
        if have >= n:
            return st.keys[:n]
        if self.hash_salt is not None:
            hashes = st.request.block_hashes
            n = min(n, len(hashes))
            if n > have:
                st.keys = np.concatenate([st.keys, hashes_array(list(hashes[have:n]))]) if have else \
                    hashes_array(list(hashes[:n]))
        else:  # token mode (vLLM's hashes differ between processes): the whole prefix is hashed again
            st.keys = self.kv.block_keys(st.tokens(n * self.block_size))
            if counted:
                self.token_keyings += 1
        if counted and len(st.keys) > have:
            st.keyings += 1
            self.keyings += 1
        return st.keys[:n]

    def _chain(self, st: _Request, n: int, counted: bool = False) -> tuple[np.ndarray, Any]:
        """(token ids, key chain) of the request's first n whole blocks (fewer if not keyed that far)."""
        if st.lookup is not None and st.lookup[0] == n:
            return st.tokens(n * self.block_size), st.lookup[1]
        keys = self._keys(st, n, counted)
        tokens = st.tokens(len(keys) * self.block_size)
        chain = self.kv.key_chain(tokens, st.ns, block_hashes=keys)
        for listener in self.chain_listeners:
            listener(chain, st.request)
        return tokens, chain

    def prompt_chain(self, request: Any) -> tuple[np.ndarray, Any]:
        """(token ids, key chain) of the whole blocks a lookup of the request covers (made once per request)."""
        st = self._state(request)
        n = max(0, request.num_tokens - 1) // self.block_size
        if st.lookup is None or st.lookup[0] != n:
            tokens, chain = self._chain(st, n, counted=True)
            st.lookup = (len(tokens) // self.block_size, chain)
        return st.tokens(st.lookup[0] * self.block_size), st.lookup[1]

    # ---------------------------------------------------------------------------------------------- load

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        rid = request.request_id
        kv = self.kv
        try:
            tokens, chain = self.prompt_chain(request)  # vLLM computes the last token itself
            cpu, ssd = kv.lookup(tokens, chain=chain)
            if ssd > cpu and ssd > num_computed_tokens:
                task = self.prefetches.get(rid)
                if task is None:
                    task = kv.prefetch_async(tokens, chain=chain)
                    self.prefetches.hold(rid, task)
                if task not in kv.try_wait(task):
                    return None, False  # blocks are coming up from SSD or remote: vLLM asks again later
                self.prefetches.pop(rid)
                cpu, ssd = kv.lookup(tokens, chain=chain)
                tries = self.prefetch_tries[rid] = self.prefetch_tries.get(rid, 0) + 1
                if ssd > cpu and tries < _PREFETCH_TRIES:  # another request's promotion brings some of them up
                    return None, False
            self.prefetch_tries.pop(rid, None)
        except Exception as e:  # a lookup that fails is a miss
            self.prefetches.drop(rid)
            self.misses.failed("lookup", rid, e)
            return 0, False
        external = max(0, cpu - num_computed_tokens)
        if external == 0:
            return 0, False
        self.matched[rid] = num_computed_tokens
        return external, not self.layerwise

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
            st = self._state(request)
            tokens, chain = self._chain(st, end // bs)
            mask = np.zeros(len(tokens), dtype=bool)
            mask[start:] = True
            tier = self.kv.tier_info()
            task, _ = self.kv.get_match(tokens, mask, chain=chain)
            taken = self.kv.try_take_external(task)
            if taken is None:  # some blocks come up from SSD again
                if self.layerwise:  # a load inside this step's forward cannot wait for them
                    raise RuntimeError("blocks left the CPU tier between the lookup and the load")
                self.promoting[rid] = (task, block_ids, wanted, tier)
                return
            self.orders.append(self._load_order(rid, task, block_ids, wanted, tier, *taken))
            if not st.hit:
                st.hit = True
                self.hit_requests += 1
                self.hit_request_keyings += st.keyings
        except Exception as e:  # nothing loads: the worker reports every promised block as failed
            self.misses.failed("load", rid, e)
            end_task(self.kv, task)
            self._give_up(rid, block_ids, wanted)

    def _load_order(self, rid: str, task: int, block_ids: list[int], wanted: range, tier: dict[str, Any],
                    seq_blocks: np.ndarray, host_ids: np.ndarray) -> CopyOrder:
        self._same_tier(tier)
        ids = np.asarray(block_ids, dtype=np.int64)
        engine = ids[np.asarray(seq_blocks, dtype=np.int64)]
        promised = ids[wanted.start:wanted.stop]
        order = CopyOrder(rid, engine.tolist(), host_ids.tolist(),
                          error_blocks=promised[~np.isin(promised, engine)].tolist(),
                          order_id=self.ledger.add(rid, task, store=False), sync=self.layerwise, tier=tier)
        self.hit_tokens += len(engine) * self.block_size
        if rid in self.preempted:
            self.resumed_hit_tokens += len(engine) * self.block_size
        if order.error_blocks:
            self.misses.count += 1
            logger.warning("FlexKV: request %s: %d of %d promised blocks are gone; vLLM recomputes them", rid,
                           len(order.error_blocks), len(wanted))
        return order

    def _give_up(self, rid: str, block_ids: list[int], wanted: range) -> None:
        """Orders nothing but reports every promised block as failed: vLLM recomputes them."""
        self.misses.count += 1
        self.orders.append(CopyOrder(rid, [], [], error_blocks=list(block_ids[wanted.start:wanted.stop]),
                                     sync=self.layerwise))

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
                self.misses.failed("load", rid, e)
                end_task(self.kv, task)
                self._give_up(rid, block_ids, wanted)

    # --------------------------------------------------------------------------------------------- store

    def _store(self, st: _Request, n: int) -> None:
        """Orders the copy of the request's first n blocks that FlexKV lacks (st.blocks are their vLLM ids)."""
        rid = st.request.request_id
        task = None
        try:
            tokens, chain = self._chain(st, n)
            n = len(tokens) // self.block_size
            if n <= st.stored:
                return
            tier = self.kv.tier_info()
            task, _ = self.kv.put_match(tokens, chain=chain)
            seq_blocks, host_ids = self.kv.take_external(task)
            st.stored = n
            if len(seq_blocks) == 0:
                self.kv.finish_external(task, True)
                return
            self._same_tier(tier)
            sources = np.asarray(st.blocks, dtype=np.int64)[np.asarray(seq_blocks, dtype=np.int64)]
        except Exception as e:
            self.misses.failed("store", rid, e)
            end_task(self.kv, task)
            st.stored = max(st.stored, n)
            return
        order_id = self.ledger.add(rid, task, store=True)
        self.orders.append(CopyOrder(rid, sources.tolist(), host_ids.tolist(), store=True, order_id=order_id,
                                     tier=tier))
        self.stored_tokens += len(sources) * self.block_size
        self.store_orders += 1

    def _track(self, so: Any) -> None:
        """Follows vLLM's block tables and computed tokens through the step's scheduler output."""
        for new in getattr(so, "scheduled_new_reqs", None) or ():
            st = self.reqs.get(new.req_id)
            if st is not None:
                st.blocks = list(new.block_ids[0]) if new.block_ids else []
                st.computed = int(new.num_computed_tokens)
        cached = getattr(so, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = getattr(cached, "resumed_req_ids", None) or set()
            for i, rid in enumerate(cached.req_ids):
                st = self.reqs.get(rid)
                if st is None:
                    continue
                new_ids = cached.new_block_ids[i]
                if rid in resumed:
                    st.blocks = list(new_ids[0]) if new_ids else []
                elif new_ids:
                    st.blocks.extend(new_ids[0])
                st.computed = int(cached.num_computed_tokens[i])

    def _store_computed(self, so: Any) -> None:
        """Orders the blocks this step's forward fills (copied after it)."""
        bs = self.block_size
        for rid, n in (getattr(so, "num_scheduled_tokens", None) or {}).items():
            st = self.reqs.get(rid)
            if st is None:
                continue
            full = min(st.computed + int(n), st.request.num_tokens, len(st.blocks) * bs) // bs
            if full > st.stored:
                self._store(st, full)

    def _preempted(self, so: Any) -> list[int]:
        """Store orders of the requests vLLM preempted in this step: the workers wait for them first."""
        flush: list[int] = []
        for rid in getattr(so, "preempted_req_ids", None) or ():
            self.preemptions += 1
            self.preempted.add(rid)
            flush += self.ledger.stores_of(rid)
            st = self.reqs.get(rid)
            if st is not None:
                st.blocks, st.lookup = [], None
        self.flushed_orders += len(flush)
        return flush

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        self.matched.pop(rid, None)
        self.prefetches.drop(rid)
        self.prefetch_tries.pop(rid, None)
        self.preempted.discard(rid)
        st = self._state(request)
        del self.reqs[rid]
        waiting = self.promoting.pop(rid, None)
        if waiting is not None:
            # Aborted while its blocks come up from SSD: vLLM frees its blocks only once the workers report it
            # in finished_recving, so an empty load is ordered (every promised block failed); the CPU blocks go
            # back once the SSD reads end. Nothing of it is stored: it computed nothing.
            end_task(self.kv, waiting[0])
            _, block_ids_wanted, wanted, _ = waiting
            self.orders.append(CopyOrder(rid, [], [], error_blocks=list(block_ids_wanted[wanted.start:wanted.stop]),
                                         sync=self.layerwise))
            return False, None
        if self.ledger.loads_of(rid):  # aborted while loading: vLLM frees its blocks once the load is reported
            return False, None
        n = min(request.num_computed_tokens, len(block_ids) * self.block_size) // self.block_size
        if n > st.stored:
            st.blocks = list(block_ids)
            self._store(st, n)
        if not self.ledger.stores_of(rid):
            return False, None
        self.awaiting.append(rid)  # vLLM keeps the blocks until the workers report the copies done
        return True, None

    def has_pending_stores(self) -> bool:
        """True while copies of stores are in flight: vLLM's engine loop keeps stepping so they are reported.
        Should the workers report nothing for _SILENT_WORKERS_S, the engine may go idle (the stores are then
        settled at shutdown)."""
        if not self.ledger.has_stores():
            return False
        if time.monotonic() - self.ledger.last_report < _SILENT_WORKERS_S:
            return True
        if not self._warned_silent:
            self._warned_silent = True
            logger.warning("FlexKV: the workers reported no copy for %.0f s while stores are in flight; vLLM's "
                           "engine may go idle, the stores are settled at shutdown", _SILENT_WORKERS_S)
        return False

    # ------------------------------------------------------------------------------------------ per step

    def build_connector_meta(self, scheduler_output: Any) -> FlexKVConnectorMetadata:
        self._order_promoted_loads()
        flush: list[int] = []
        if scheduler_output is not None:
            self._track(scheduler_output)
            flush = self._preempted(scheduler_output)
            if self.store_as_computed:
                self._store_computed(scheduler_output)
        orders, self.orders = self.orders, []
        awaiting, self.awaiting = self.awaiting, []
        no_forward = getattr(scheduler_output, "total_num_scheduled_tokens", None) == 0
        return FlexKVConnectorMetadata(orders=orders, flush=flush, awaiting=awaiting, receipts=self.ledger.receipts,
                                       no_forward=no_forward)

    def update_connector_output(self, connector_output: Any) -> None:
        """Ends the tasks whose copies every worker reports done."""
        self.ledger.report(getattr(connector_output, "kv_connector_worker_meta", None))
        for rid in getattr(connector_output, "finished_recving", None) or ():
            self.ledger.end_request(rid, store=False, ok=True)
        for rid in getattr(connector_output, "finished_sending", None) or ():
            self.ledger.end_request(rid, store=True, ok=False)  # only orders a worker never reported are left

    def _same_tier(self, tier: dict[str, Any]) -> None:
        """Raises if the control plane's CPU tier changed while a task was being taken (a `flexkv serve` that
        restarted in between): its block ids would name another tier's blocks."""
        if self.kv.tier_info() != tier:
            raise FlexKVError("the FlexKV server restarted while the request's blocks were being matched")

    def reset_cache(self) -> bool:
        """vLLM's ``reset_prefix_cache(reset_connector=True)`` (after a weight update): drops every cached block,
        so no later request hits KV of the old weights. False (vLLM reports the reset failed) while workers
        still copy blocks of this connector's requests."""
        busy = len(self.ledger) + len(self.promoting)
        if busy:
            logger.warning("FlexKV: reset_cache refused: %d copies are in flight; retry when idle", busy)
            return False
        for rid, task in self.prefetches.items():  # promotions from SSD: their blocks are about to go
            self.prefetches.pop(rid)
            end_task(self.kv, task)
        self.matched.clear()
        for st in self.reqs.values():  # requests that ran across the reset hold KV of the old weights
            st.stored = _NEVER
            st.lookup = None
        try:
            self.kv.reset()
        except Exception as e:  # vLLM reports the reset failed; FlexKV keeps serving
            self.misses.count += 1
            logger.error("FlexKV: reset_cache failed, vLLM reports the reset as failed: %s", e)
            return False
        return True

    def shutdown(self) -> None:
        """After vLLM stopped the workers: keeps the stores they completed, ends every other order, then stops
        the control plane (which finishes the write-through of the kept blocks to SSD)."""
        if self._closed:
            return
        self._closed = True
        for rid in list(self.promoting):
            end_task(self.kv, self.promoting.pop(rid)[0])
        for rid, _ in self.prefetches.items():
            self.prefetches.drop(rid)
        kept, dropped = self.ledger.close()
        if kept or dropped:
            logger.info("FlexKV: at shutdown %d store copies in flight were kept, %d dropped", kept, dropped)
        try:
            self.kv.shutdown()
        except Exception as e:  # the engine is stopping: a server that is gone must not fail that
            logger.warning("FlexKV: shutting the connector's manager down failed: %s", e)

    def stats(self) -> dict[str, Any]:
        out = {"hit_tokens": self.hit_tokens, "stored_tokens": self.stored_tokens, "store_orders": self.store_orders,
               "failures": self.misses.count + self.ledger.failed_orders,
               "resumed_hit_tokens": self.resumed_hit_tokens, "preemptions": self.preemptions,
               "flushed_orders": self.flushed_orders, "keyings": self.keyings, "token_keyings": self.token_keyings,
               "hit_requests": self.hit_requests, "hit_request_keyings": self.hit_request_keyings}
        if not self._closed:
            try:
                out.update({k: v for k, v in self.kv.cache_stats().items() if k.startswith(("ssd_", "remote_"))})
            except Exception as e:  # a server that is gone has no counters to give
                logger.warning("FlexKV: the control plane's counters are unavailable: %s", e)
        return out
