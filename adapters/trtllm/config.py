"""FlexKV's settings for one TensorRT-LLM executor: the JSON (``FLEXKV_CONFIG_PATH``) checked against the
executor's ``llm_args`` (TensorRT-LLM's ``TorchLlmArgs``). Every refusal names the key to change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexkv.core import CacheConfig, ConfigError, block_size_for_engine, load_config


@dataclass
class TrtllmSettings:
    cache_config: CacheConfig
    model_name: str
    tokens_per_block: int


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def settings_from_llm_args(llm_args: Any) -> TrtllmSettings:
    """Reads FlexKV's config and refuses executor settings the connector cannot serve."""
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size"):
        value = _get(llm_args, key, 1) or 1
        if int(value) != 1:
            raise ConfigError(f"{key}={value}: FlexKV's TensorRT-LLM connector runs with one rank in this version; "
                              f"use {key}=1 (or serve several single-GPU executors)", key)
    if _get(llm_args, "enable_attention_dp", False):
        raise ConfigError("enable_attention_dp: FlexKV's TensorRT-LLM connector does not support attention DP; "
                          "set enable_attention_dp to false", "enable_attention_dp")
    beams = _get(llm_args, "max_beam_width", 1) or 1
    if int(beams) != 1:
        raise ConfigError(f"max_beam_width={beams}: the connector caches beam 0 only; use max_beam_width=1",
                          "max_beam_width")
    kv_cache = _get(llm_args, "kv_cache_config")
    if kv_cache is not None:
        if _get(kv_cache, "enable_block_reuse", True) is False:
            raise ConfigError("kv_cache_config.enable_block_reuse is false: TensorRT-LLM consults a KV cache "
                              "connector only with block reuse on; set enable_block_reuse: true",
                              "kv_cache_config.enable_block_reuse")
        if _get(kv_cache, "enable_partial_reuse", False):
            raise ConfigError("kv_cache_config.enable_partial_reuse is true: FlexKV loads whole blocks after a "
                              "block-aligned device prefix; set enable_partial_reuse: false",
                              "kv_cache_config.enable_partial_reuse")
        if _get(kv_cache, "host_cache_size", None):
            raise ConfigError("kv_cache_config.host_cache_size is set: TensorRT-LLM's own host offload moves "
                              "blocks between pool slots, which breaks the block ids FlexKV copies; FlexKV is "
                              "the host tier, so drop host_cache_size", "kv_cache_config.host_cache_size")
    cache = load_config().cache_config
    block = _get(kv_cache, "tokens_per_block", None) if kv_cache is not None else None
    if block:
        cache = block_size_for_engine(cache, int(block), "TensorRT-LLM", "kv_cache_config.tokens_per_block")
    return TrtllmSettings(cache_config=cache, model_name=str(_get(llm_args, "model", "") or ""),
                          tokens_per_block=cache.tokens_per_block)
