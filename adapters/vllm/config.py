"""FlexKV's configuration for one vLLM engine: the JSON (``FLEXKV_CONFIG_PATH``) plus what vLLM knows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flexkv.core import CacheConfig, ConfigError, ModelConfig, block_size_for_engine, load_config

logger = logging.getLogger("flexkv")


@dataclass
class VllmSettings:
    cache_config: CacheConfig
    model_name: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_size: int
    use_mla: bool
    kv_dtype: Any  # the KV cache's torch dtype
    layout_tag: str  # the engine's byte order inside a block: engines with different ones never share blocks
    tp_size: int = 1  # tensor-parallel workers: each holds num_kv_heads heads of every block (MLA: all of it)
    num_workers: int = 1  # worker processes that each copy their slice of every block (report every order)
    load_mode: str = "async"  # "async": whole loads before the request runs; "layerwise": inside the forward
    store_mode: str = "computed"  # "computed": blocks stored as each step fills them; "finished": when a request ends
    hash_salt: str | None = None  # keys come from vLLM's block hashes, salted with this; None: from token ids


LOAD_MODES = ("async", "layerwise")
STORE_MODES = ("computed", "finished")


def settings_from_vllm(vllm_config: Any) -> VllmSettings:
    """Reads FlexKV's config and checks it against the engine; every error names the key to change."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or getattr(parallel, "data_parallel_size", 1) > 1:
        raise ConfigError("FlexKV's vLLM connector runs tensor-parallel workers but not pipeline or data "
                          f"parallelism in this version: pipeline_parallel_size={parallel.pipeline_parallel_size}, "
                          f"data_parallel_size={getattr(parallel, 'data_parallel_size', 1)}; use 1 for both (run "
                          "several engines on one `flexkv serve` instead of data-parallel ranks)")
    for name in ("prefill_context_parallel_size", "decode_context_parallel_size"):
        if int(getattr(parallel, name, 1) or 1) > 1:  # KV split by tokens across ranks: not FlexKV's head slices
            raise ConfigError(f"FlexKV's vLLM connector does not support context parallelism in this version: "
                              f"{name}={getattr(parallel, name)}; use 1", name)
    block_size = int(vllm_config.cache_config.block_size)
    cache = block_size_for_engine(load_config().cache_config, block_size, "vLLM", "block_size")
    model = vllm_config.model_config
    kv_dtype = _kv_dtype(vllm_config)
    from vllm.platforms import current_platform

    layout_tag = f"vllm:{current_platform.device_type}:{kv_dtype}:{block_size}"
    return VllmSettings(cache_config=cache, model_name=str(model.model), block_size=block_size,
                        num_layers=int(model.get_num_layers(parallel)),
                        num_kv_heads=int(model.get_num_kv_heads(parallel)), head_size=int(model.get_head_size()),
                        use_mla=bool(getattr(model, "use_mla", False)), kv_dtype=kv_dtype, layout_tag=layout_tag,
                        tp_size=int(parallel.tensor_parallel_size),
                        num_workers=int(getattr(parallel, "world_size", 1) or 1),
                        load_mode=_extra_choice(vllm_config, "flexkv_load_mode", LOAD_MODES),
                        store_mode=_extra_choice(vllm_config, "flexkv_store_mode", STORE_MODES),
                        hash_salt=_hash_salt(vllm_config))


def _extra_choice(vllm_config: Any, key: str, choices: tuple[str, ...]) -> str:
    """``kv_connector_extra_config: {key: one of choices}`` (default: the first)."""
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    value = str(extra.get(key, choices[0]))
    if value not in choices:
        raise ConfigError(f"kv_connector_extra_config.{key} is {value!r}; use one of {list(choices)}", key)
    return value


def _hash_salt(vllm_config: Any) -> str | None:
    """The salt of keys made from vLLM's ``request.block_hashes``, or None where those hashes differ from one
    process to the next (a non-cryptographic hash without PYTHONHASHSEED): then FlexKV hashes token ids."""
    import hashlib
    import os

    algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256"))
    seed = os.getenv("PYTHONHASHSEED")
    if seed is None:
        if algo.startswith("xxhash"):
            return None
        try:
            from vllm.v1.core.kv_cache_utils import DEFAULT_NONE_HASH_SEED
        except ImportError:
            return None
        seed = str(DEFAULT_NONE_HASH_SEED)
    return f"vllm-hash:{algo}:{hashlib.sha256(seed.encode()).hexdigest()[:16]}"


def _kv_dtype(vllm_config: Any) -> Any:
    """The dtype of vLLM's KV cache: the model's unless cache_dtype says otherwise (fp8 is not cached)."""
    cache_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if cache_dtype != "auto":
        raise ConfigError(f"vLLM's kv_cache_dtype is {cache_dtype!r}; FlexKV's vLLM connector caches the model's "
                          "own dtype in this version: leave kv_cache_dtype at 'auto'", "kv_cache_dtype")
    return vllm_config.model_config.dtype


def model_config_for(settings: VllmSettings) -> ModelConfig:
    """The FlexKV ModelConfig of the engine's KV cache. A block holds every tensor-parallel worker's heads (vLLM's
    num_kv_heads is per worker; heads replicated over workers are stored once per worker); MLA's latent is the
    same in every worker, so it is stored once and its blocks are the same at any tensor-parallel size."""
    tp = 1 if settings.use_mla else settings.tp_size
    heads = 1 if settings.use_mla else settings.num_kv_heads * tp
    return ModelConfig(num_layers=settings.num_layers, num_kv_heads=heads, head_size=settings.head_size,
                       use_mla=settings.use_mla, dtype=settings.kv_dtype, tp_size=tp)
