"""What the scheduler-side connector hands the workers each step (vLLM's KVConnectorMetadata)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class CopyOrder:
    """Copy vLLM blocks engine_blocks[i] <-> CPU-tier blocks host_blocks[i] for one request."""

    request_id: str
    engine_blocks: list[int]
    host_blocks: list[int]
    store: bool = False  # engine -> CPU tier; else CPU tier -> engine
    error_blocks: list[int] = field(default_factory=list)  # blocks of a load that cannot be delivered
    # KVManager.tier_info() of the control plane that handed out host_blocks: a restarted `flexkv serve` has
    # a new CPU tier, and an order of the old one must never touch the new one's blocks
    tier: dict[str, Any] = field(default_factory=dict)


@dataclass
class FlexKVConnectorMetadata(KVConnectorMetadata):
    orders: list[CopyOrder] = field(default_factory=list)
