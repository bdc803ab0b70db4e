"""What vLLM's built-in ``FlexKVConnectorV1`` imports (vLLM >= 0.17.2), and the original FlexKV's names of the
connector's two halves: ``FlexKVSchedulerConnector`` (the scheduler's, with ``reset_cache``) and
``FlexKVWorkerConnector`` (a worker's, with ``before_device_sleep`` / ``after_device_wake``)."""

from flexkv.adapters.vllm.impl import FlexKVConnectorImpl as FlexKVConnectorV1Impl
from flexkv.adapters.vllm.scheduler_side import SchedulerSide as FlexKVSchedulerConnector
from flexkv.adapters.vllm.worker_side import WorkerSide as FlexKVWorkerConnector

__all__ = ["FlexKVConnectorV1Impl", "FlexKVSchedulerConnector", "FlexKVWorkerConnector"]
