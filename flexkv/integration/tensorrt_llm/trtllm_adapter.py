"""``connector_module: flexkv.integration.tensorrt_llm.trtllm_adapter`` (the module path FlexKV's docs give)."""

from flexkv.adapters.trtllm.scheduler import FlexKVSchedulerConnector
from flexkv.adapters.trtllm.worker import FlexKVWorkerConnector

__all__ = ["FlexKVSchedulerConnector", "FlexKVWorkerConnector"]
