"""FlexKV for vLLM: a KV connector V1 (vLLM 0.32 API).

Two ways in, both with ``FLEXKV_CONFIG_PATH`` pointing at FlexKV's JSON config:

- vLLM's built-in connector: ``--kv-transfer-config '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both"}'``
  imports ``flexkv.integration.vllm.vllm_v1_adapter.FlexKVConnectorV1Impl`` (``FlexKVConnectorImpl`` here).
- This module's own connector class: add ``"kv_connector_module_path":"flexkv.adapters.vllm"``.

vLLM is imported only when a connector is constructed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FlexKVConnectorImpl", "FlexKVConnectorV1"]


def __getattr__(name: str) -> Any:
    if name == "FlexKVConnectorV1":  # subclasses vLLM's base class: needs vLLM, so imported on first use
        from .connector import FlexKVConnectorV1

        return FlexKVConnectorV1
    if name == "FlexKVConnectorImpl":
        from .impl import FlexKVConnectorImpl

        return FlexKVConnectorImpl
    raise AttributeError(name)
