"""The FlexKV side of one TensorRT-LLM executor, shared by its scheduler and worker connectors.

TensorRT-LLM builds both connectors in the executor's process from the same ``llm_args`` (the scheduler
on rank 0 only; with one rank both live in that process). The worker's ``register_kv_caches`` starts the
control plane (a KVManager over the executor's KV pool); the scheduler finds it through ``llm_args``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flexkv.core import EngineLayout, KVManager, LayoutError, Misses, ModelConfig, canonical_dtype_name

from .config import TrtllmSettings

logger = logging.getLogger("flexkv")

_SESSIONS: dict[int, Session] = {}
_SESSIONS_LOCK = threading.Lock()


class Session:
    def __init__(self, llm_args: Any, settings: TrtllmSettings) -> None:
        self.llm_args = llm_args  # held, so its id() stays this session's key
        self.settings = settings
        self.kv: KVManager | None = None
        self.num_layers = 0
        self.lock = threading.Lock()
        self.saving: dict[int, int] = {}   # request id -> put task copying the request's blocks out
        self.loading: dict[int, int] = {}  # request id -> get task of an asynchronous load
        self.misses = Misses()  # failures inside FlexKV: misses or stores skipped, logged and counted

    def start(self, pool: Any) -> None:
        """Starts the control plane over TensorRT-LLM's pool ``[num_blocks, num_layers, kv_factor, chunk]``."""
        with self.lock:
            if self.kv is not None:
                raise LayoutError("register_kv_caches: the KV pool is already registered for this executor")
            model, layout, tag = pool_layout(pool, self.settings.tokens_per_block)
            kv = KVManager(model, self.settings.cache_config, namespace=self.settings.model_name, layout_tag=tag)
            kv.start()
            try:
                kv.register_kv_caches(layout)
            except BaseException:
                kv.shutdown()
                raise
            self.num_layers = model.num_layers
            self.kv = kv
        logger.info("FlexKV: TensorRT-LLM pool registered (%s), %d CPU blocks of %d bytes", tag,
                    kv.cache_config.num_cpu_blocks, kv.block_bytes)

    def shutdown(self) -> None:
        with self.lock:
            kv, self.kv = self.kv, None
        if kv is not None:
            kv.shutdown()


def pool_layout(pool: Any, tokens_per_block: int) -> tuple[ModelConfig, EngineLayout, str]:
    """The model shape, engine layout and layout tag of TensorRT-LLM's primary KV pool.

    A block is contiguous across layers; the layout takes one view per layer, so a load can complete
    layer by layer on the GPU.
    """
    shape = tuple(int(s) for s in getattr(pool, "shape", ()))
    if len(shape) != 4 or shape[2] not in (1, 2):
        raise LayoutError(f"register_kv_caches: TensorRT-LLM's KV pool has shape {shape}; FlexKV expects "
                          "[num_blocks, num_layers, kv_factor (2, or 1 for MLA), tokens_per_block*kv_heads*head_dim]")
    num_blocks, num_layers, kv_factor, chunk = shape
    if chunk % tokens_per_block:
        raise LayoutError(f"register_kv_caches: the pool's last dimension {chunk} is not a multiple of "
                          f"tokens_per_block={tokens_per_block}; set FlexKV's tokens_per_block to TensorRT-LLM's")
    if not pool.is_contiguous():
        raise LayoutError("register_kv_caches: TensorRT-LLM's KV pool is not contiguous; FlexKV copies whole "
                          "blocks of the primary pool (get_unique_primary_pool())")
    dtype = canonical_dtype_name(pool.dtype, "kv pool dtype")
    model = ModelConfig(num_layers=num_layers, num_kv_heads=1, head_size=chunk // tokens_per_block,
                        use_mla=kv_factor == 1, dtype=dtype)
    layout = EngineLayout.from_block_views([pool[:, layer] for layer in range(num_layers)],
                                           "TensorRT-LLM KV pool", layers=list(range(num_layers)))
    device = str(pool.device).split(":")[0]
    tag = f"trtllm:{device}:{dtype}:{tokens_per_block}:kv{kv_factor}x{chunk}"
    return model, layout, tag


def session_for(llm_args: Any, settings: TrtllmSettings) -> Session:
    """The session of the executor that ``llm_args`` configures, created by whichever connector comes first."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(id(llm_args))
        if session is None or session.llm_args is not llm_args:
            session = Session(llm_args, settings)
            _SESSIONS[id(llm_args)] = session
        return session


def drop_session(llm_args: Any) -> None:
    """Shuts the executor's session down (tests, executor teardown)."""
    with _SESSIONS_LOCK:
        session = _SESSIONS.pop(id(llm_args), None)
    if session is not None:
        session.shutdown()
