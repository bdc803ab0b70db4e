"""The FlexKV side of one TensorRT-LLM executor, shared by its scheduler and worker connectors.

TensorRT-LLM builds both connectors in the executor's process from the same ``llm_args`` (the scheduler
on rank 0 only; with one rank both live in that process). The worker's ``register_kv_caches`` starts the
control plane (a KVManager over the executor's KV pool); the scheduler finds it through ``llm_args``.

With ``tensor_parallel_size`` N > 1 every rank's pool holds its head slice. Rank 0's worker starts the
KVManager (``tp_size`` N), which hosts the rank dispatcher at the ``gpu_register_port`` beside the config's
``server_recv_port``; every rank's worker registers its pool there with a RankAgent, which copies that rank's
slice of each block the scheduler launches. Rank 0's registration returns once every rank registered.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flexkv.core import (
    EngineLayout,
    KVManager,
    LayoutError,
    Misses,
    ModelConfig,
    RankAgent,
    ServerSettings,
    ServerUnavailable,
    canonical_dtype_name,
)

from .config import TrtllmSettings

logger = logging.getLogger("flexkv")

_SESSIONS: dict[int, Session] = {}
_SESSIONS_LOCK = threading.Lock()


class Session:
    def __init__(self, llm_args: Any, settings: TrtllmSettings) -> None:
        self.llm_args = llm_args  # held, so its id() stays this session's key
        self.settings = settings
        self.kv: KVManager | None = None  # rank 0
        self.agent: RankAgent | None = None  # this rank's copies, with tensor parallelism
        self.num_layers = 0
        self.lock = threading.Lock()
        self.saving: dict[int, int] = {}   # request id -> put task copying the request's blocks out
        self.loading: dict[int, int] = {}  # request id -> get task of an asynchronous load
        self.misses = Misses()  # failures inside FlexKV: misses or stores skipped, logged and counted

    def start(self, pool: Any) -> None:
        """Starts the control plane over TensorRT-LLM's pool ``[num_blocks, num_layers, kv_factor, chunk]``."""
        st = self.settings
        with self.lock:
            if self.kv is not None or self.agent is not None:
                raise LayoutError("register_kv_caches: the KV pool is already registered for this executor")
            model, layout, tag = pool_layout(pool, st.tokens_per_block, st.tp_size, st.tp_rank)
            self.num_layers = model.num_layers
            if st.tp_rank > 0:
                self.agent = _join(st.gpu_register_port, layout, st.tp_rank)
                logger.info("FlexKV: TensorRT-LLM rank %d/%d registered its pool (%s)", st.tp_rank, st.tp_size, tag)
                return
            kv = KVManager(model, st.cache_config, namespace=st.model_name, layout_tag=tag,
                           gpu_register_port=st.gpu_register_port)
            kv.start()
            try:
                kv.register_kv_caches(layout)
                deadline = time.monotonic() + RANKS_WAIT_S
                while not kv.is_ready():
                    if time.monotonic() > deadline:
                        raise LayoutError(f"register_kv_caches: not every one of the {st.tp_size} tensor-parallel "
                                          f"ranks registered its pool at {st.gpu_register_port} within "
                                          f"{RANKS_WAIT_S:g} s")
                    time.sleep(0.01)
            except BaseException:
                kv.shutdown()
                raise
            self.kv, self.agent = kv, kv.rank_agent
        logger.info("FlexKV: TensorRT-LLM pool registered (%s), %d CPU blocks of %d bytes", tag,
                    kv.cache_config.num_cpu_blocks, kv.block_bytes)

    def shutdown(self) -> None:
        with self.lock:
            kv, self.kv = self.kv, None
            agent, self.agent = self.agent, None
        if agent is not None and kv is None:
            agent.close()
        if kv is not None:
            kv.shutdown()


RANKS_WAIT_S = 120.0  # how long the ranks of one executor may take to register their pools


def _join(port: str, layout: EngineLayout, rank: int) -> RankAgent:
    """A rank's pool joins rank 0's KVManager (which may still be starting)."""
    deadline = time.monotonic() + RANKS_WAIT_S
    while True:
        try:
            return RankAgent(port, lambda model: layout, token=ServerSettings.from_env().server_token, rank=rank)
        except ServerUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def pool_layout(pool: Any, tokens_per_block: int, tp_size: int = 1,
                tp_rank: int = 0) -> tuple[ModelConfig, EngineLayout, str]:
    """The model shape, engine layout and layout tag of TensorRT-LLM's primary KV pool (of rank ``tp_rank``
    of ``tp_size``: its chunk holds that rank's heads; MLA: every rank holds the whole latent).

    A block is contiguous across layers; the layout takes one view per layer and k|v, so a load can complete
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
    mla = kv_factor == 1
    slices = 1 if mla else tp_size  # a rank's chunk is one "head" of the host block's [tp rank] slices
    model = ModelConfig(num_layers=num_layers, num_kv_heads=slices, head_size=chunk // tokens_per_block,
                        use_mla=mla, dtype=dtype, tp_size=tp_size)
    # One view per layer and k|v: the host block is [layer][k|v][tp rank][...] on every engine.
    layout = EngineLayout.from_block_views([pool[:, layer, kv] for layer in range(num_layers)
                                            for kv in range(kv_factor)], "TensorRT-LLM KV pool",
                                           layers=[layer for layer in range(num_layers) for _ in range(kv_factor)],
                                           tp_size=slices, tp_rank=0 if mla else tp_rank)
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
