"""TensorRT-LLM's connector base classes when TensorRT-LLM is installed, else plain stand-ins.

TensorRT-LLM 1.2 has them in ``tensorrt_llm._torch.pyexecutor.kv_cache_connector``; later releases in
``tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector``. Both take ``llm_args`` and keep it as
``self._llm_args``; the worker's base keeps the metadata bound by ``bind_connector_meta`` as
``self._metadata``. The stand-ins do the same, so the connector behaves alike with and without it.
"""

from __future__ import annotations

import importlib
from typing import Any

BASE_MODULES = (
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
)


class StandaloneScheduler:
    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args


class StandaloneWorker:
    def __init__(self, llm_args: Any) -> None:
        self._llm_args = llm_args
        self._metadata: Any = None

    def bind_connector_meta(self, metadata: Any) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> Any:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None


def connector_bases() -> tuple[type, type]:
    """(scheduler base, worker base): TensorRT-LLM's if it imports, else the stand-ins."""
    for name in BASE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.KvCacheConnectorScheduler, module.KvCacheConnectorWorker
    return StandaloneScheduler, StandaloneWorker


SchedulerBase, WorkerBase = connector_bases()
