"""``flexkv.server.client.KVTPClient``: how SGLang's ranks hand their KV buffers to FlexKV.

SGLang's connector builds one per rank with ``gpu_register_port`` and calls ``register_to_server`` with
its KV buffers: for MHA every layer's K buffer, then every layer's V buffer, each
``[num_pages * page_size, kv_heads, head_dim]``; for MLA one latent buffer per layer. With one rank the
KVManager lives in the same process and takes the buffers directly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flexkv.core import EngineLayout, KVCacheLayout, LayoutError, RankAgent, ServerSettings, load_config, manager_for


def token_pool_layout(kv_caches: list[Any], kv_layout: KVCacheLayout, *, tp_size: int = 1,
                      tp_rank: int = 0) -> EngineLayout:
    """An engine layout over SGLang's token-indexed per-layer buffers: engine block b is page b; with
    ``tp_size`` > 1 the buffers hold TP rank ``tp_rank``'s heads."""
    layers, ps, num_pages = kv_layout.num_layer, kv_layout.tokens_per_block, kv_layout.num_block
    per_layer = 1 if kv_layout.is_mla else 2
    if len(kv_caches) != layers * per_layer:
        raise LayoutError(f"register_to_server: {len(kv_caches)} KV buffers for {layers} layers; SGLang passes "
                          f"{'one latent buffer per layer' if kv_layout.is_mla else 'K buffers, then V buffers'}")
    views, owners = [], []
    for layer in range(layers):
        for kv in range(per_layer):
            buf = kv_caches[kv * layers + layer]
            if len(buf.shape) == 4 and tuple(buf.shape[:2]) == (num_pages, ps):  # [pages, page, heads, dim]
                buf = buf.reshape(num_pages * ps, *buf.shape[2:])
            if tuple(buf.shape)[0] < num_pages * ps or not buf.is_contiguous():
                raise LayoutError(f"register_to_server: buffer {kv * layers + layer} has shape {tuple(buf.shape)}; "
                                  f"expected a contiguous [{num_pages * ps}, heads, head_dim]")
            views.append(buf[: num_pages * ps].reshape(num_pages, -1))
            owners.append(layer)
    return EngineLayout.from_block_views(views, f"SGLang token pool ({layers} layers, page {ps})", layers=owners,
                                         tp_size=tp_size, tp_rank=tp_rank)


def engine_layout(kv_caches: list[Any], kv_layout: KVCacheLayout, *, tp_size: int = 1,
                  tp_rank: int = 0) -> EngineLayout:
    """SGLang's token-indexed buffers (``[pages * page_size, heads, head_dim]``, or ``[pages, page_size, heads,
    head_dim]``, K buffers then V buffers) as a token pool; any other tensors as ``kv_layout`` describes them
    (the original FlexKV's layouts: per-layer LAYERFIRST / LAYERBLOCK tensors, one BLOCKFIRST tensor, vLLM's
    packed and 3-D MLA per-layer tensors)."""
    lay = kv_layout
    shape = tuple(kv_caches[0].shape) if kv_caches else ()
    pool = (len(shape) == 3 and shape[0] >= lay.num_block * lay.tokens_per_block) or (
        len(shape) == 4 and shape[:2] == (lay.num_block, lay.tokens_per_block) and kv_caches[0].is_contiguous())
    if pool:
        return token_pool_layout(kv_caches, lay, tp_size=tp_size, tp_rank=tp_rank)
    return EngineLayout.from_kv_layout(kv_caches, lay, tp_size=tp_size, tp_rank=tp_rank)


class KVTPClient:
    """One rank's registration. With one rank and the KVManager in this process, the manager takes the buffers
    directly; otherwise (tensor parallelism, or server mode) the rank joins the manager's (or the server's)
    rank dispatcher at ``gpu_register_port`` with a RankAgent, which copies this rank's head slice of every
    block (tp rank: ``device_id % tp_size``). In the process of a KVManager with ranks (SGLang's TP rank 0)
    the registration returns once every rank has registered (up to ``READY_WAIT_S``): SGLang's leader
    otherwise polls the manager's readiness only every 10 s."""

    READY_WAIT_S = 60.0

    def __init__(self, gpu_register_port: str, dp_client_id: int = 0, device_id: int = 0, pp_rank: int = 0,
                 intra_client_id: int | None = None) -> None:
        # The original FlexKV's argument order; intra_client_id (the rank within its data-parallel client) picks
        # the tensor-parallel slice when given, else device_id does.
        for name, value in (("dp_client_id", dp_client_id), ("device_id", device_id), ("pp_rank", pp_rank),
                            ("intra_client_id", 0 if intra_client_id is None else intra_client_id)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LayoutError(f"KVTPClient: {name} must be a non-negative int, got {value!r}")
        if pp_rank != 0:
            raise LayoutError("KVTPClient: pp_rank > 0 (pipeline parallelism) is not supported in this version")
        self.gpu_register_port = gpu_register_port
        self.dp_client_id = dp_client_id
        self.pp_rank = pp_rank
        self.device_id = device_id
        self.intra_client_id = intra_client_id
        self.agent: RankAgent | None = None

    @property
    def _rank(self) -> int:
        return self.device_id if self.intra_client_id is None else self.intra_client_id

    def register_to_server(self, kv_caches: list[Any], kv_layout: KVCacheLayout, indexer_buffers: Any = None,
                           indexer_layout: Any = None) -> None:
        if indexer_buffers:
            raise LayoutError("register_to_server: the sparse-attention indexer cache (NSA models) is not served "
                              "by FlexKV in this version")
        manager = manager_for(self.gpu_register_port)
        caches = list(kv_caches)
        if manager is not None and not manager.uses_ranks:
            manager.register_kv_caches(engine_layout(caches, kv_layout))
            return
        settings = ServerSettings.from_env()

        def layout(model: dict[str, Any]) -> EngineLayout:
            tp = 1 if model["use_mla"] else int(model["tp_size"])
            return engine_layout(caches, kv_layout, tp_size=tp, tp_rank=self._rank % tp)

        self.close()
        instance = settings.instance_id * max(1, _dp_size()) + self.dp_client_id
        self.agent = RankAgent(self.gpu_register_port, layout, instance=instance, token=settings.server_token,
                               rank=lambda model: self.device_id % int(model["tp_size"]))
        with _AGENTS_LOCK:
            _AGENTS[(self.dp_client_id, self.pp_rank)] = self.agent
        if manager is not None:
            deadline = time.monotonic() + self.READY_WAIT_S
            while not manager.is_ready() and time.monotonic() < deadline:
                time.sleep(0.02)

    def close(self) -> None:
        if self.agent is not None:
            with _AGENTS_LOCK:
                if _AGENTS.get((self.dp_client_id, self.pp_rank)) is self.agent:
                    del _AGENTS[(self.dp_client_id, self.pp_rank)]
            self.agent.close()
            self.agent = None

    def set_slot_mapping(self, task_id: int, slot_mapping: Any) -> None:
        raise NotImplementedError("set_slot_mapping serves cross-node pipeline parallelism, which FlexKV does not "
                                  "support in this version")


_AGENTS: dict[tuple[int, int], RankAgent] = {}  # (dp_client_id, pp_rank) -> this process's rank agent
_AGENTS_LOCK = threading.Lock()


def agent_of(dp_client_id: int, pp_rank: int) -> RankAgent | None:
    """The RankAgent this process registered for (dp_client_id, pp_rank), if any."""
    with _AGENTS_LOCK:
        return _AGENTS.get((dp_client_id, pp_rank))


def _dp_size() -> int:
    model = load_config(None).model_config
    return model.dp_size if model is not None else 1
