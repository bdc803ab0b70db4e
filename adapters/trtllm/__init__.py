"""FlexKV for TensorRT-LLM: a KV cache connector for the PyTorch backend (TensorRT-LLM 1.2 API).

``trtllm-serve <model> --backend pytorch --extra_llm_api_options extra-llm-api-config.yml`` with::

    kv_connector_config:
      connector_module: flexkv.adapters.trtllm
      connector_scheduler_class: FlexKVSchedulerConnector
      connector_worker_class: FlexKVWorkerConnector

and ``FLEXKV_CONFIG_PATH`` pointing at FlexKV's JSON config. TensorRT-LLM is imported only when a
connector class is first used; without it the classes stand alone (for tests and other executors).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FlexKVSchedulerConnector", "FlexKVWorkerConnector", "FlexKVConnectorMetadata"]


def __getattr__(name: str) -> Any:
    if name == "FlexKVSchedulerConnector":
        from .scheduler import FlexKVSchedulerConnector

        return FlexKVSchedulerConnector
    if name == "FlexKVWorkerConnector":
        from .worker import FlexKVWorkerConnector

        return FlexKVWorkerConnector
    if name == "FlexKVConnectorMetadata":
        from .metadata import FlexKVConnectorMetadata

        return FlexKVConnectorMetadata
    raise AttributeError(name)
