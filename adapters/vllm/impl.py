"""``FlexKVConnectorImpl``: FlexKV's connector for one of vLLM's roles (``FlexKVConnectorV1Impl`` in vLLM's
terms: vLLM's built-in ``FlexKVConnectorV1`` constructs it as ``FlexKVConnectorV1Impl(vllm_config, role)``
and forwards every connector call to it).

The scheduler role holds FlexKV's control plane (scheduler_side.py); each worker role copies blocks
between its KV memory and the CPU tier as the scheduler orders (worker_side.py). They meet through the
connector metadata vLLM sends each step and the request ids vLLM reports back, so they work whether the
worker runs in the scheduler's process or in its own.
"""

from __future__ import annotations

import logging
from typing import Any

from flexkv.core import setup_logging

from .config import settings_from_vllm
from .versions import check_vllm_version

logger = logging.getLogger("flexkv")


class FlexKVConnectorImpl:
    def __init__(self, vllm_config: Any, role: Any) -> None:
        import vllm

        setup_logging()
        check_vllm_version(vllm.__version__)
        self.is_worker = "WORKER" in str(getattr(role, "name", role)).upper()
        self._stats: Any = None  # metrics.StatsDelta, made on vLLM's first ask
        settings = settings_from_vllm(vllm_config)
        if self.is_worker:
            from .worker_side import WorkerSide

            self.worker = WorkerSide(settings, vllm_config)
            self.scheduler = None
        else:
            from .scheduler_side import SchedulerSide

            self.scheduler = SchedulerSide(settings)
            self.worker = None
        from .kv_events import tier_events_for  # FlexKV's tiers in vLLM's KV events (kv_events.py)

        self.events = tier_events_for(vllm_config, self.scheduler) if self.scheduler is not None else None
        logger.info("FlexKV vLLM connector (%s role) for %s, block size %d",
                    "worker" if self.is_worker else "scheduler", settings.model_name, settings.block_size)

    # ------------------------------------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.start_load_kv(_bound_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # requests whose blocks load wait in vLLM's scheduler until the whole load is done

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores copy whole blocks once the request finishes

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors() if self.worker is not None else set()

    # --------------------------------------------------------------------------------------- scheduler

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.events is not None:
            self.events.note_request(request)  # its blocks' events carry its LoRA adapter and cache salt
        return self.scheduler.request_finished(request, block_ids)

    def take_events(self) -> list[Any]:
        """FlexKV's block events as vLLM KV events (kv_events.py); vLLM publishes them with its own."""
        return self.events.take() if self.events is not None else []

    def get_kv_connector_stats(self) -> Any:
        """The scheduler side's FlexKVConnectorStats since the last step (metrics.py); None on workers."""
        if self.scheduler is None:
            return None
        if self._stats is None:
            from .metrics import StatsDelta

            self._stats = StatsDelta(self.scheduler.kv, self.scheduler)
        return self._stats.take()

    def reset_cache(self) -> bool | None:
        """``reset_prefix_cache(reset_connector=True)`` reaches the scheduler's connector: FlexKV drops every
        cached block (True), or refuses while copies run (False). None on a worker (nothing to reset there)."""
        return self.scheduler.reset_cache() if self.scheduler is not None else None

    def before_device_sleep(self) -> int:
        return self.worker.before_device_sleep() if self.worker is not None else 0

    def after_device_wake(self) -> None:
        if self.worker is not None:
            self.worker.after_device_wake()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.shutdown()


def _bound_metadata() -> Any:
    """The metadata vLLM bound to this worker's connector for the current step. vLLM binds it to the
    connector object it holds (its built-in wrapper, or ours), which this implementation sits behind."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    return connector._get_connector_metadata() if connector.has_connector_metadata() else None
