"""``FlexKVConnectorImpl``: FlexKV's connector for one of vLLM's roles (``FlexKVConnectorV1Impl`` in vLLM's
terms: vLLM's built-in ``FlexKVConnectorV1`` constructs it as ``FlexKVConnectorV1Impl(vllm_config, role)``
and forwards every connector call to it).

The scheduler role holds FlexKV's control plane (scheduler_side.py); each worker role copies blocks
between its KV memory and the CPU tier as the scheduler orders (worker_side.py). They meet through the
connector metadata vLLM sends each step and the request ids vLLM reports back, so they work whether the
worker runs in the scheduler's process or in its own.
"""

from __future__ import annotations

import atexit
import logging
import sys
import weakref
from typing import Any

from flexkv.core import setup_logging

from .config import settings_from_vllm
from .versions import check_vllm_version

logger = logging.getLogger("flexkv")
_IMPLS: weakref.WeakSet[FlexKVConnectorImpl] = weakref.WeakSet()
# vLLM calls these on its connector object; its built-in FlexKVConnectorV1 does not forward them, so FlexKV
# binds them onto that object (FlexKV's own class defines them).
_HOOKS = ("handle_preemptions", "build_connector_worker_meta", "has_pending_push_work")


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
        logger.info("FlexKV vLLM connector (%s role) for %s, block size %d, %s loads",
                    "worker" if self.is_worker else "scheduler", settings.model_name, settings.block_size,
                    settings.load_mode)
        if not _IMPLS:
            atexit.register(_flush_at_exit)
        _IMPLS.add(self)
        _bind_hooks(sys._getframe(1).f_locals.get("self"), self)

    # ------------------------------------------------------------------------------------------ worker

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker.start_load_kv(_bound_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # stores copy whole blocks after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(_bound_metadata())

    def handle_preemptions(self, metadata: Any) -> None:
        if self.worker is not None:
            self.worker.handle_preemptions(metadata)

    def build_connector_worker_meta(self) -> Any:
        return self.worker.build_connector_worker_meta() if self.worker is not None else None

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
        out = self.scheduler.request_finished(request, block_ids)
        if self.events is not None:  # after its last key chain (the tail store's)
            self.events.forget(request.request_id)
        return out

    def has_pending_push_work(self) -> bool:
        """True while stores are in flight: vLLM's engine keeps stepping until the workers report them."""
        return self.scheduler is not None and self.scheduler.has_pending_stores()

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


def _bind_hooks(owner: Any, impl: FlexKVConnectorImpl) -> None:
    """Binds the calls of _HOOKS that vLLM makes on ``owner``, the connector object that constructed ``impl``
    (vLLM's built-in FlexKVConnectorV1), where its class leaves them to vLLM's base class."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    except ImportError:
        return
    if not isinstance(owner, KVConnectorBase_V1):
        return
    for name in _HOOKS:
        if getattr(type(owner), name, None) is getattr(KVConnectorBase_V1, name, None):
            setattr(owner, name, getattr(impl, name))


def _flush_at_exit() -> None:
    """At interpreter exit (an offline engine never shut down): workers first, so the scheduler side keeps the
    stores they completed, then the scheduler sides, which write them through to SSD."""
    impls = list(_IMPLS)
    for impl in impls:
        if impl.worker is not None:
            impl.shutdown()
    for impl in impls:
        if impl.scheduler is not None:
            impl.shutdown()


def _bound_metadata() -> Any:
    """The metadata vLLM bound to this worker's connector for the current step. vLLM binds it to the
    connector object it holds (its built-in wrapper, or ours), which this implementation sits behind."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    return connector._get_connector_metadata() if connector.has_connector_metadata() else None
