"""What vLLM's built-in ``FlexKVConnectorV1`` imports (vLLM >= 0.17.2), and the original FlexKV's names of the
connector's two halves: ``FlexKVSchedulerConnector`` (the scheduler's, with ``reset_cache``) and
``FlexKVWorkerConnector`` (a worker's, with ``before_device_sleep`` / ``after_device_wake``).

The two halves import vLLM, so they are imported on first use: this module imports without vLLM."""

from typing import Any

from flexkv.adapters.vllm.impl import FlexKVConnectorImpl as FlexKVConnectorV1Impl

__all__ = ["FlexKVConnectorV1Impl", "FlexKVSchedulerConnector", "FlexKVWorkerConnector"]  # noqa: F822 (lazy)


def __getattr__(name: str) -> Any:
    if name == "FlexKVSchedulerConnector":
        from flexkv.adapters.vllm.scheduler_side import SchedulerSide

        return SchedulerSide
    if name == "FlexKVWorkerConnector":
        from flexkv.adapters.vllm.worker_side import WorkerSide

        return WorkerSide
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
