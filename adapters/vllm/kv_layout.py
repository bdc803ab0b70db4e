"""vLLM's per-layer KV cache tensors as a FlexKV engine layout."""

from __future__ import annotations

import re
from typing import Any

from flexkv.core import EngineLayout, LayoutError

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def _layer_index(name: str, fallback: int) -> int:
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else fallback


def layout_from_kv_caches(kv_caches: dict[str, Any], num_blocks: int | None = None, tp_size: int = 1,
                          tp_rank: int = 0) -> tuple[EngineLayout, str, int]:
    """(engine layout, layout tag, number of layer tensors) of vLLM's ``{layer name: tensor}``.

    A layer tensor is either K and V apart, ``[2, num_blocks, ...]`` (the GPU attention backends'
    ``(2, num_blocks, block_size, heads, head_size)``), or whole blocks, ``[num_blocks, ...]`` (K and V
    inside each block, as vLLM's CPU backend and FlashInfer keep them, or one latent for MLA). A block
    (or a block's K and V) must be contiguous; only whole blocks are copied, so byte orders inside a
    block that FlexKV does not interpret (the CPU backend's transposed K) are kept as they are. The
    tag names the byte order, so engines that lay blocks out differently never share cached blocks.
    With ``tp_size`` > 1 the tensors are worker ``tp_rank``'s heads: its slice of each host chunk.
    """
    if not kv_caches:
        raise LayoutError("register_kv_caches: vLLM registered no KV cache tensors")
    named = sorted(((_layer_index(n, i), n, t) for i, (n, t) in enumerate(kv_caches.items())), key=lambda x: x[0])
    seen: set[int] = set()
    views: list[Any] = []
    layers: list[int] = []
    shapes = set()
    for position, (_, name, t) in enumerate(named):
        if t.data_ptr() in seen:  # layers that share one cache tensor move once
            continue
        seen.add(t.data_ptr())
        shape = tuple(int(s) for s in t.shape)
        split = len(shape) >= 3 and shape[0] == 2 and (num_blocks is None or shape[1] == num_blocks) and \
            (num_blocks is not None or shape[1] != 2)
        if split:
            views += [t[0], t[1]]
            layers += [position, position]
        else:
            if num_blocks is not None and shape[0] != num_blocks:
                raise LayoutError(f"register_kv_caches: layer {name!r} has shape {shape}; FlexKV expects "
                                  f"[2, {num_blocks}, ...] or [{num_blocks}, ...] (num_blocks first or second)")
            views.append(t)
            layers.append(position)
        shapes.add((split, shape[1:] if not split else shape[2:], str(t.dtype)))
    try:
        layout = EngineLayout.from_block_views(views, "vLLM per-layer KV caches", layers=layers, tp_size=tp_size,
                                               tp_rank=tp_rank)
    except LayoutError as e:
        raise LayoutError(f"register_kv_caches: {e} (vLLM layer tensors of shape {sorted(shapes)[0][1]})") from e
    if len(shapes) != 1:
        raise LayoutError(f"register_kv_caches: vLLM's layers differ in KV cache shape or dtype ({sorted(shapes)}); "
                          "FlexKV caches models whose attention layers share one KV shape")
    split, inner, dtype = shapes.pop()
    tag = f"vllm:{'kv-split' if split else 'block-first'}:{inner}:{dtype}"
    return layout, tag, len(seen)


def layer_positions(kv_caches: dict[str, Any]) -> dict[str, int]:
    """vLLM layer name -> its layer in the layout of :func:`layout_from_kv_caches` (the segment group a
    layer-wise copy completes it in)."""
    named = sorted(((_layer_index(n, i), n) for i, n in enumerate(kv_caches)), key=lambda x: x[0])
    return {name: position for position, (_, name) in enumerate(named)}
