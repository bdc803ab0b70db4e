"""What the scheduler-side connector hands the workers each step (vLLM's KVConnectorMetadata), and what the
workers hand back (vLLM's KVConnectorWorkerMetadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class CopyOrder:
    """Copy vLLM blocks engine_blocks[i] <-> CPU-tier blocks host_blocks[i] for one request. ``order_id`` names
    the order in the workers' reports (one control-plane task per order)."""

    request_id: str
    engine_blocks: list[int]
    host_blocks: list[int]
    store: bool = False  # engine -> CPU tier; else CPU tier -> engine
    error_blocks: list[int] = field(default_factory=list)  # blocks of a load that cannot be delivered
    # KVManager.tier_info() of the control plane that handed out host_blocks: a restarted `flexkv serve` has
    # a new CPU tier, and an order of the old one must never touch the new one's blocks
    tier: dict[str, Any] = field(default_factory=dict)
    order_id: int = 0
    sync: bool = False  # a load that this step's forward waits for, layer by layer (wait_for_layer_load)


@dataclass
class FlexKVConnectorMetadata(KVConnectorMetadata):
    orders: list[CopyOrder] = field(default_factory=list)
    # Store orders of requests vLLM preempted in this step: their blocks may be overwritten by this step's
    # forward, so handle_preemptions waits for these copies first.
    flush: list[int] = field(default_factory=list)
    # Finished requests whose blocks vLLM keeps until a worker reports them in finished_sending (once the
    # request's store copies on that worker are done).
    awaiting: list[str] = field(default_factory=list)
    receipts: str = ""  # the file where a worker that shuts down records the store orders it completed
    # The step schedules no token: its only work is requests waiting for their loads (asynchronous mode).
    no_forward: bool = False


@dataclass
class FlexKVWorkerMetadata(KVConnectorWorkerMetadata):
    """Orders a worker finished since its last report: order id -> number of workers that copied it (``ok``)
    or failed it (``failed``). vLLM sums the workers' reports of one step with ``aggregate``; the scheduler
    ends an order's task once every worker has reported it."""

    ok: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, FlexKVWorkerMetadata):
            return self
        for mine, theirs in ((self.ok, other.ok), (self.failed, other.failed)):
            for order, n in theirs.items():
                mine[order] = mine.get(order, 0) + n
        return self
