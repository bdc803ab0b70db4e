"""``FlexKVConnectorV1``: FlexKV's own vLLM connector class, for ``"kv_connector_module_path":
"flexkv.adapters.vllm"`` (vLLM builds without FlexKV built in, or custom builds). It forwards each call
to ``FlexKVConnectorImpl``, as vLLM's built-in ``FlexKVConnectorV1`` does."""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .impl import FlexKVConnectorImpl


class FlexKVConnectorV1(KVConnectorBase_V1):
    # vLLM's prompt_tokens_cached_by_source: every load comes from FlexKV's CPU tier (SSD blocks are promoted
    # there first; vllm:flexkv_tier_hit_tokens_total{tier="ssd"} counts those).
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._impl = FlexKVConnectorImpl(vllm_config, role)

    def shutdown(self) -> None:
        self._impl.shutdown()

    # worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._impl.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._impl.start_load_kv(forward_context, **kwargs)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._impl.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        self._impl.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self) -> None:
        self._impl.wait_for_save()

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        self._impl.handle_preemptions(kv_connector_metadata)

    def build_connector_worker_meta(self) -> Any:
        return self._impl.build_connector_worker_meta()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._impl.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._impl.get_block_ids_with_load_errors()

    # scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._impl.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._impl.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return self._impl.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._impl.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._impl.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self._impl.has_pending_push_work()

    def take_events(self) -> Any:
        return self._impl.take_events()

    def get_kv_connector_stats(self) -> Any:
        return self._impl.get_kv_connector_stats()

    def reset_cache(self) -> bool | None:
        return self._impl.reset_cache()

    def before_device_sleep(self) -> int:
        return self._impl.before_device_sleep()

    def after_device_wake(self) -> None:
        self._impl.after_device_wake()
    # vLLM's stat loggers: FlexKV in /metrics and the stats log line (metrics.py)
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        from .metrics import FlexKVConnectorStats

        return FlexKVConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from .metrics import FlexKVPromMetrics

        return FlexKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
