"""SGLang's HiCache host pool as a FlexKV engine layout: a FlexKV block is one host page.

The layout comes from the pool's own ``get_page_buffer_meta`` (the pointers SGLang hands zero-copy
storage backends): the chunks of page 0 and page 1 give each chunk's base and page stride, and the last
page checks them. Inside a FlexKV block the chunks lie in the order of the pool's flat data page
(``get_data_page(index, flat=True)``), so the zero-copy calls and the legacy flat-page calls share pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexkv.core import EngineLayout, LayoutError, ModelConfig, canonical_dtype_name

SUPPORTED = {False: ("layer_first", "page_first", "page_first_direct", "page_head"),
             True: ("layer_first", "page_first", "page_first_direct")}


def _meta(host: Any, page: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    ps = int(host.page_size)
    ptrs, sizes = host.get_page_buffer_meta(torch.arange(page * ps, (page + 1) * ps, dtype=torch.int64))
    return np.asarray(ptrs, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


def host_pool_layout(host: Any, is_mla: bool) -> tuple[EngineLayout, ModelConfig, str]:
    """(engine layout over the pool's pages, the FlexKV model shape of a page, a layout tag)."""
    layout_name = str(getattr(host, "layout", ""))
    if layout_name not in SUPPORTED[is_mla]:
        kind = "MLA" if is_mla else "MHA"
        raise LayoutError(f"SGLang host layout {layout_name!r} ({kind}) is not served by FlexKV's storage backend; "
                          f"use --hicache-mem-layout with one of {', '.join(SUPPORTED[is_mla])}")
    ps = int(host.page_size)
    num_pages = int(host.size) // ps
    if num_pages < 2:
        raise LayoutError(f"SGLang's host pool holds {num_pages} page(s); FlexKV needs at least two")
    p0, sizes = _meta(host, 0)
    p1, _ = _meta(host, 1)
    plast, _ = _meta(host, num_pages - 1)
    stride = p1 - p0
    if (plast != p0 + (num_pages - 1) * stride).any() or len(set(sizes.tolist())) != 1:
        raise LayoutError(f"SGLang host layout {layout_name!r}: pages are not evenly spaced in the pool; FlexKV "
                          "cannot describe it")
    layers = int(host.layer_num)
    chunk = int(sizes[0])
    n = len(p0)
    if layout_name == "layer_first" and not is_mla:
        # Meta order: layer by layer, K then V; the flat page holds every layer's K, then every layer's V.
        order = np.array([(c % 2) * layers + c // 2 for c in range(n)], dtype=np.int64)
    else:
        order = np.arange(n, dtype=np.int64)
    segments = np.stack([p0, stride, order * chunk, sizes], axis=1).astype(np.int64)
    block_bytes = chunk * n
    dtype = canonical_dtype_name(host.dtype, "host pool dtype")
    itemsize = int(host.dtype.itemsize)
    kv_factor = 1 if is_mla else 2
    head_size = block_bytes // (kv_factor * layers * ps * itemsize)
    model = ModelConfig(num_layers=layers, num_kv_heads=1, head_size=head_size, use_mla=is_mla, dtype=dtype)
    if model.block_bytes(ps) != block_bytes:
        raise LayoutError(f"SGLang host pool pages hold {block_bytes} bytes, which is not {layers} layers x "
                          f"{kv_factor} x {ps} tokens of {dtype}")
    layout = EngineLayout(segments=np.ascontiguousarray(segments), num_blocks=num_pages, block_bytes=block_bytes,
                          description=f"SGLang host pool {layout_name}", keepalive=[host])
    layout.validate()
    tag = f"sglang-host:{layout_name}:{dtype}:{'mla' if is_mla else 'mha'}:{layers}x{chunk}"
    return layout, model, tag
