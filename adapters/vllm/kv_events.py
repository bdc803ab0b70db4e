"""FlexKV's tiers in vLLM's KV event stream, for routers (NVIDIA Dynamo's KV router).

vLLM's scheduler appends what the connector's ``take_events()`` returns to its own KV event batches, which
it publishes on ``--kv-events-config``'s endpoint; Dynamo's worker relays them to its router. This module
turns the control plane's block events (``ControlPlane.take_events()``: stored / removed / cleared, per tier,
with key, parent key, position and token ids) into vLLM's event classes:

- ``BlockStored`` with the blocks' token ids, ``parent_block_hash`` (the previous block's hash; None at a
  sequence's first block), ``block_size`` = vLLM's block size and ``medium`` = the tier (``MEDIUMS``).
  Consecutive blocks of one chain and tier are one event.
- ``BlockRemoved`` with the same hashes and medium when a block leaves a tier.
- A tier cleared (``reset_cache``): ``BlockRemoved`` for every block it held, then ``AllBlocksCleared`` when
  the reset cleared every tier.

Contracts a router relies on:

- Hash ids: vLLM's own ids of the same blocks (``request.block_hashes`` through vLLM's
  ``maybe_convert_block_hash``, what vLLM's device-tier events carry), the same in a block's stored and
  removed events and as the parent of its successor. Dynamo's router hashes each block's token ids itself
  for matching, but its host and disk index continues a worker's device-tier match from the last device
  block's id: ids of another space would never continue it, and a worker holding any prefix in vLLM's cache
  would get no credit for the rest in FlexKV. The ids are learnt from the key chains the scheduler side makes
  (``note_chain``: FlexKV's key of block i of a request is made from the request's block i), so no token is
  hashed again; a block no chain of this process named (restored from SSD at start) is not published.
- Namespace: a block of a request with a LoRA adapter carries ``lora_name``; a salted one carries its salt
  in ``extra_keys`` as vLLM writes them (the adapter's name on every block, the salt on a sequence's first
  block only), recorded with its id.
- The remote tier reports nothing: every worker reads the shared store, so crediting the worker that wrote a
  block would steer every request for it to one worker for no gain (docs/dynamo.md).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger("flexkv")

# The medium each tier reports; Dynamo's router maps CPU_PINNED to its host tier (--router-host-cache-hit-weight)
# and DISK to its disk tier (--router-disk-cache-hit-weight). A tier missing here publishes nothing.
MEDIUMS: dict[str, str] = {"cpu": "CPU_PINNED", "ssd": "DISK"}
EVENT_CAPACITY = 1 << 16  # the control plane's event log; past it the oldest are dropped (and counted)
ROOTS_CAPACITY = 1 << 16  # chains' first blocks whose namespace is remembered (the oldest are forgotten)


@dataclass(frozen=True)
class BlockNamespace:
    """What a router hashes besides a block's tokens."""
    lora_name: str | None = None
    cache_salt: str | None = None

    def extra_keys(self, position: int) -> tuple[str, ...] | None:
        """vLLM's event extra keys of the block at ``position``: the adapter's name on every block, the cache
        salt on a sequence's first block only (vLLM hashes it into that block alone)."""
        keys = tuple(k for k in (self.lora_name, self.cache_salt if position == 0 else None) if k)
        return keys or None


def _namespace_of_request(request: Any) -> BlockNamespace:
    lora = getattr(request, "lora_request", None)
    return BlockNamespace(lora_name=None if lora is None else str(getattr(lora, "lora_name", lora)),
                          cache_salt=getattr(request, "cache_salt", None) or None)


def _hash64(key: Any) -> int:
    """A block key ([1, 2] or [2] uint64) as the 64-bit id events carry."""
    return int(np.asarray(key, dtype=np.uint64).reshape(-1)[0])


class TierEvents:
    """Drains a control plane's block events as vLLM KV events. ``kv``: the connector's KVManager (its
    ``control_plane``); ``block_size``: vLLM's block size."""

    def __init__(self, kv: Any, block_size: int) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        self._stored_cls, self._removed_cls, self._cleared_cls = BlockStored, BlockRemoved, AllBlocksCleared
        self.kv = kv
        self.block_size = int(block_size)
        if int(kv.tokens_per_block) != self.block_size:
            logger.warning("FlexKV: tokens_per_block %d differs from vLLM's block size %d: the router cannot use "
                           "FlexKV's block events, none are published", kv.tokens_per_block, self.block_size)
        # FlexKV's block id (low 64 bits of its key) -> (vLLM's id of the block, its namespace), from note_chain
        self.ids: dict[int, tuple[Any, BlockNamespace]] = {}
        cache = kv.cache_config
        self.id_capacity = 4 * (int(getattr(cache, "num_cpu_blocks", 0) or 0)
                                + int(getattr(cache, "num_ssd_blocks", 0) or 0)) + 4096
        self.named: dict[str, int] = {}  # request id -> its leading blocks whose ids are recorded
        self.live: dict[str, dict[int, Any]] = defaultdict(dict)  # tier -> FlexKV id -> vLLM id published
        self.dropped = 0
        self.unknown = 0
        kv.control_plane.enable_events(EVENT_CAPACITY)

    # ------------------------------------------------------------------------------------------- ids

    def note_chain(self, chain: Any, request: Any) -> None:
        """Records vLLM's ids of the blocks a key chain of ``request`` names, and their namespace
        (SchedulerSide.chain_listeners); only blocks not recorded for the request before."""
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        keys = getattr(chain.run, "keys", None)
        hashes = getattr(request, "block_hashes", None) or ()
        n = min(0 if keys is None else len(keys), len(hashes))
        rid = str(request.request_id)
        start = self.named.get(rid, 0)
        if n <= start:
            return
        ns = _namespace_of_request(request)
        ours = np.asarray(keys[start:n], dtype=np.uint64).reshape(n - start, -1)[:, 0].tolist()
        self.ids.update(zip(ours, [(maybe_convert_block_hash(h), ns) for h in hashes[start:n]]))
        self.named[rid] = n
        if len(self.ids) > self.id_capacity:
            self._prune()

    def forget(self, request_id: str) -> None:
        """The request finished: its recorded ids stay (its blocks may still be stored), its count goes."""
        self.named.pop(str(request_id), None)

    def _prune(self) -> None:
        """Forgets the oldest ids of blocks no tier holds (until half the capacity is left)."""
        held = set().union(*self.live.values()) if self.live else set()
        for h in list(self.ids):
            if len(self.ids) <= self.id_capacity // 2:
                break
            if h not in held:
                del self.ids[h]

    # ----------------------------------------------------------------------------------------- events

    def take(self) -> list[Any]:
        """vLLM events for the block events since the last call (an empty list when there are none)."""
        plane = self.kv.control_plane
        if plane is None or int(self.kv.tokens_per_block) != self.block_size:
            return []
        raw = plane.take_events()
        dropped = int(plane.events_dropped)
        if dropped > self.dropped:
            logger.warning("FlexKV: %d block events were dropped (the event log holds %d): the router's view of "
                           "FlexKV's tiers is incomplete until those blocks leave", dropped - self.dropped,
                           EVENT_CAPACITY)
            self.dropped = dropped
        out: list[Any] = []
        run: dict[str, Any] | None = None  # the BlockStored being built
        cleared: set[str] = set()
        for kind, tier, key, parent, position, tokens in raw:
            medium = MEDIUMS.get(tier)
            if medium is None:
                continue
            if kind == "stored":
                h, p = _hash64(key), None if int(position) == 0 else _hash64(parent)
                toks = np.asarray(tokens, dtype=np.int64)
                if len(toks) != self.block_size:
                    continue  # page-keyed blocks carry no tokens: nothing a router can hash
                known = self.ids.get(h)
                parent = None if p is None else self.ids.get(p)
                if known is None or (p is not None and parent is None):
                    self._unknown()
                    continue
                ext, ns = known
                self.live[tier][h] = ext
                if run is not None and run["medium"] == medium and run["ours"][-1] == p and run["ns"] == ns:
                    run["ours"].append(h)
                    run["hashes"].append(ext)
                    run["positions"].append(int(position))
                    run["tokens"].extend(toks.tolist())
                    continue
                self._flush(run, out)
                run = {"medium": medium, "ours": [h], "hashes": [ext], "parent": None if parent is None else parent[0],
                       "positions": [int(position)], "tokens": toks.tolist(), "ns": ns}
                continue
            self._flush(run, out)
            run = None
            if kind == "removed":
                ext = self.live[tier].pop(_hash64(key), None)
                if ext is not None:
                    self._removed([ext], medium, out)
            elif kind == "cleared":
                gone = list(self.live.pop(tier, {}).values())
                if gone:
                    self._removed(gone, medium, out)
                cleared.add(tier)
        self._flush(run, out)
        if cleared and cleared >= self._tiers():  # a reset: every tier FlexKV reports is empty
            out.append(self._cleared_cls())
        return out

    def _tiers(self) -> set[str]:
        return {"cpu", "ssd"} if getattr(self.kv.cache_config, "enable_ssd", False) else {"cpu"}

    def _removed(self, hashes: list[int], medium: str, out: list[Any]) -> None:
        if out and isinstance(out[-1], self._removed_cls) and out[-1].medium == medium:
            out[-1].block_hashes.extend(hashes)
        else:
            out.append(self._removed_cls(block_hashes=hashes, medium=medium))

    def _flush(self, run: dict[str, Any] | None, out: list[Any]) -> None:
        if run is None:
            return
        ns: BlockNamespace = run["ns"]
        extra = [ns.extra_keys(p) for p in run["positions"]]
        out.append(self._stored_cls(block_hashes=run["hashes"], parent_block_hash=run["parent"],
                                    token_ids=run["tokens"], block_size=self.block_size, lora_id=None,
                                    medium=run["medium"], lora_name=ns.lora_name,
                                    extra_keys=extra if any(k is not None for k in extra) else None))

    def _unknown(self) -> None:
        self.unknown += 1
        if self.unknown == 1:
            logger.warning("FlexKV: a stored block's vLLM id is unknown here (no request of this process named it: "
                           "restored from SSD, or stored by another engine): its events are not published")


def tier_events_for(vllm_config: Any, scheduler: Any) -> TierEvents | None:
    """The scheduler-side connector's events, when vLLM publishes KV events (``--kv-events-config`` with
    ``enable_kv_cache_events``); None otherwise (nothing is recorded then). A control plane in a ``flexkv
    serve`` publishes no events through its clients: that is a warning, not an error."""
    events_config = getattr(vllm_config, "kv_events_config", None)
    if events_config is None or not getattr(events_config, "enable_kv_cache_events", False):
        return None
    plane = scheduler.kv.control_plane
    if not hasattr(plane, "take_events"):
        logger.warning("FlexKV: vLLM publishes KV events, but FlexKV's control plane runs in `flexkv serve`, whose "
                       "clients do not receive its block events: the router will not see FlexKV's tiers")
        return None
    if getattr(scheduler.kv.cache_config, "enable_remote", False):
        logger.info("FlexKV: KV events report the CPU and SSD tiers; the shared remote tier is not reported "
                    "(every worker reads it)")
    events = TierEvents(scheduler.kv, scheduler.block_size)
    scheduler.chain_listeners.append(events.note_chain)
    return events


__all__ = ["EVENT_CAPACITY", "MEDIUMS", "BlockNamespace", "TierEvents", "tier_events_for"]
