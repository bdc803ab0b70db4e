"""FlexKV's settings for one TensorRT-LLM executor: the JSON (``FLEXKV_CONFIG_PATH``) checked against the
executor's ``llm_args`` (TensorRT-LLM's ``TorchLlmArgs``). Every refusal names the key to change."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flexkv.core import CacheConfig, ConfigError, block_size_for_engine, load_config, rank_endpoint


@dataclass
class TrtllmSettings:
    cache_config: CacheConfig
    model_name: str
    tokens_per_block: int
    tp_size: int = 1
    tp_rank: int = 0  # this process's rank (TensorRT-LLM's mpi_rank())
    gpu_register_port: str = ""  # where the ranks register their pools with rank 0's KVManager


def executor_rank() -> int:
    """This process's rank in the executor: TensorRT-LLM's ``mpi_rank()``, else the MPI launcher's
    ``OMPI_COMM_WORLD_RANK`` / ``PMI_RANK`` (0 without either)."""
    try:
        from tensorrt_llm._utils import mpi_rank
    except ImportError:
        return int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    return int(mpi_rank())


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def settings_from_llm_args(llm_args: Any) -> TrtllmSettings:
    """Reads FlexKV's config and refuses executor settings the connector cannot serve."""
    for key in ("pipeline_parallel_size", "context_parallel_size"):
        value = _get(llm_args, key, 1) or 1
        if int(value) != 1:
            raise ConfigError(f"{key}={value}: FlexKV's TensorRT-LLM connector serves tensor parallelism "
                              f"(tensor_parallel_size) in this version, not {key}; use {key}=1", key)
    tp_size = int(_get(llm_args, "tensor_parallel_size", 1) or 1)
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
    config = load_config()
    cache = config.cache_config
    block = _get(kv_cache, "tokens_per_block", None) if kv_cache is not None else None
    if block:
        cache = block_size_for_engine(cache, int(block), "TensorRT-LLM", "kv_cache_config.tokens_per_block")
    rank = executor_rank() % tp_size if tp_size > 1 else 0
    return TrtllmSettings(cache_config=cache, model_name=str(_get(llm_args, "model", "") or ""),
                          tokens_per_block=cache.tokens_per_block, tp_size=tp_size, tp_rank=rank,
                          gpu_register_port=rank_endpoint(config.server_recv_port) if tp_size > 1 else "")
