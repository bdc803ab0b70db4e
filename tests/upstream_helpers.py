"""Helpers of the tests that drive FlexKV as the original FlexKV's users and tests do: its constructors (torch
dtypes, ``kv_dim``, its CacheConfig arguments), its KV layouts registered through ``KVTPClient``, its
slot-mapping convention (every token of a block given the block's first slot) and its batch handles.

Engine memory is CPU torch tensors; every block is filled with random bytes and compared byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.common.storage import KVCacheLayout, KVCacheLayoutType
from flexkv.kvmanager import KVManager
from flexkv.server.client import KVTPClient

# The original's test defaults, made small: a model, a cache (with its arguments that have no effect here).
MODEL = {"num_layers": 2, "num_kv_heads": 4, "head_size": 16, "dtype": torch.float16, "kv_dim": 2, "tp_size": 1,
         "dp_size": 1}
CACHE = {"tokens_per_block": 16, "enable_cpu": True, "enable_ssd": False, "enable_remote": False,
         "num_cpu_blocks": 128, "num_ssd_blocks": 256, "enable_gds": False, "num_remote_blocks": 512,
         "remote_cache_size_mode": "block_num", "remote_file_size": 1 << 30, "remote_file_num": 16,
         "remote_file_prefix": "remote_cache"}
LAYOUTS = ("layerfirst", "vllm_packed", "vllm_mla")


def original_slots(block_ids: Sequence[int], tokens_per_block: int, length: int = -1) -> torch.Tensor:
    """The original's slot mapping: every token of a block gets the block's first slot."""
    ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
    slots = ids.repeat_interleave(tokens_per_block) * tokens_per_block
    return slots if length < 0 else slots[:length]


@dataclass
class OriginalEngine:
    """Per-layer KV tensors in one of the original's test layouts and a block's bytes in each."""

    kind: str
    tensors: list[torch.Tensor]
    layout: KVCacheLayout

    def block(self, b: int) -> torch.Tensor:
        return torch.cat([t[b].reshape(-1).view(torch.uint8) if self.kind != "layerfirst" else
                          t[:, b].reshape(-1).view(torch.uint8) for t in self.tensors])

    def fill(self, blocks: Sequence[int], gen: torch.Generator) -> list[torch.Tensor]:
        out = []
        for b in blocks:
            for t in self.tensors:
                view = t[b] if self.kind != "layerfirst" else t[:, b]
                raw = torch.randint(0, 255, (view.numel() * view.element_size(),), generator=gen, dtype=torch.uint8)
                view.copy_(raw.view(view.dtype).reshape(view.shape))
            out.append(self.block(b).clone())
        return out

    def clear(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            for t in self.tensors:
                (t[b] if self.kind != "layerfirst" else t[:, b]).zero_()


def make_engine(kind: str, model: ModelConfig, cache: CacheConfig, num_blocks: int) -> OriginalEngine:
    """The original test suite's layouts: LAYERFIRST per-layer tensors, vLLM's packed K|V heads (a permuted
    ``(blocks, tokens, heads, 2 * head)`` tensor, kv_dim 1) and vLLM's 3-D MLA tensors ``(blocks, tokens, latent)``."""
    L, H, D, t = model.num_layers, model.num_kv_heads, model.head_size, cache.tokens_per_block
    dtype = model.torch_dtype()
    layout = KVCacheLayout(type=KVCacheLayoutType.LAYERFIRST, num_layer=L, num_block=num_blocks, tokens_per_block=t,
                           num_head=H, head_size=D, kv_dim=model.kv_dim, num_kv_heads=model.num_kv_heads)
    if kind == "layerfirst":
        tensors = [torch.zeros(layout.kv_shape[1:], dtype=dtype) for _ in range(L)]
    elif kind == "vllm_packed":
        tensors = [torch.zeros(num_blocks, t, H, D, dtype=dtype).permute(0, 2, 1, 3) for _ in range(L)]
        assert not tensors[0].is_contiguous()
    elif kind == "vllm_mla":
        tensors = [torch.zeros(num_blocks, t, D, dtype=dtype) for _ in range(L)]
    else:
        raise ValueError(kind)
    return OriginalEngine(kind, tensors, layout)


def original_configs(layout_kind: str, model: dict[str, Any], cache: dict[str, Any], ssd_dir: Path | None
                     ) -> tuple[ModelConfig, CacheConfig]:
    """ModelConfig / CacheConfig as the original's tests build them (vLLM's packed layout: kv_dim 1 with the head
    doubled, MLA: one head of kv_dim 1)."""
    m = ModelConfig(**dict(MODEL, **model))
    if layout_kind == "vllm_packed":
        m.kv_dim = 1
        m.head_size *= 2
    if layout_kind == "vllm_mla":
        m.kv_dim = 1
        m.num_kv_heads = 1
    c = dict(CACHE, **cache)
    if c.get("enable_ssd"):
        c["ssd_cache_dir"] = [str(ssd_dir / "a"), str(ssd_dir / "b")]
    return m, CacheConfig(**c)


def start_original(layout_kind: str, model: dict[str, Any], cache: dict[str, Any], ssd_dir: Path,
                   num_blocks: int = 64) -> tuple[KVManager, OriginalEngine]:
    """A started KVManager with an engine registered through KVTPClient, as the original's tests do it."""
    m, c = original_configs(layout_kind, model, cache, ssd_dir)
    kv = KVManager(model_config=m, cache_config=c, dp_client_id=0)
    kv.start()
    eng = make_engine(layout_kind, m, c, num_blocks)
    client = KVTPClient(kv.gpu_register_port, dp_client_id=0, pp_rank=0, intra_client_id=0, device_id=0)
    client.register_to_server(eng.tensors, eng.layout)
    assert kv.is_ready()
    return kv, eng
