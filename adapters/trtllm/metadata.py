"""What the scheduler connector hands the workers each iteration (TensorRT-LLM broadcasts it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlexKVConnectorMetadata:
    # (request id, FlexKV get task) of the loads the coming forward pass waits for, layer by layer.
    sync_loads: list[tuple[int, int]] = field(default_factory=list)
