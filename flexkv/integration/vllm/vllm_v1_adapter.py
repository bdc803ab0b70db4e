"""What vLLM's built-in ``FlexKVConnectorV1`` imports (vLLM >= 0.17.2)."""

from flexkv.adapters.vllm.impl import FlexKVConnectorImpl as FlexKVConnectorV1Impl

__all__ = ["FlexKVConnectorV1Impl"]
