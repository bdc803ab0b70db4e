"""Engine KV memory layouts and how they map onto FlexKV's host block layout.

A host block is one contiguous byte range: ``[layer][k|v][tokens*heads*head_size]``.
An engine layout is reduced to *block views*: tensors whose first dimension is
the engine block id and whose ``view[b]`` is one contiguous chunk of block ``b``.
The chunks of a block, in order, make up the host block. Every layout reduces to
such views: vLLM's per-layer ``[2, num_blocks, ...]`` gives two views per layer
(K and V), a ``[num_blocks, 2, ...]`` layer gives one, a block-first pool gives
one for all layers. Layouts that ``KVCacheLayoutType`` cannot express (vLLM's CPU
backend, TensorRT-LLM's pool, SGLang's token-indexed buffers) are registered as
block views directly.

With tensor parallelism each rank registers its own heads; the host block then
holds ``[layer][k|v][tp rank][tokens*heads/tp*head_size]``, and a rank's
segments cover its slice of every chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .errors import LayoutError


class KVCacheLayoutType(Enum):
    LAYERFIRST = "LAYERFIRST"  # per layer [kv_dim, num_block, tokens_per_block, num_head, head_size]
    BLOCKFIRST = "BLOCKFIRST"  # [num_block, num_layer, kv_dim, tokens_per_block, num_head, head_size]
    LAYERBLOCK = "LAYERBLOCK"  # per layer [num_block, kv_dim, tokens_per_block, num_head, head_size]


@dataclass(init=False)
class KVCacheLayout:
    """FlexKV's description of an engine's KV cache tensors (shapes in elements).

    The arguments and their order are the original FlexKV's: ``KVCacheLayout(type, num_layer, num_block,
    tokens_per_block, num_head, head_size, kv_dim=2, num_kv_heads=1)``; ``kv_dim`` 1 is one latent per token
    (MLA, also ``is_mla=True`` by keyword). Each argument is type-checked and a wrong one fails naming it.
    """

    type: KVCacheLayoutType
    num_layer: int
    num_block: int
    tokens_per_block: int
    num_head: int
    head_size: int
    kv_dim: int = 2
    num_kv_heads: int = 1

    def __init__(self, type: KVCacheLayoutType | str, num_layer: int, num_block: int, tokens_per_block: int,
                 num_head: int, head_size: int, kv_dim: int | None = None, num_kv_heads: int = 1, *,
                 is_mla: bool | None = None) -> None:
        if isinstance(type, str):
            try:
                type = KVCacheLayoutType(type.upper())
            except ValueError:
                names = ", ".join(t.value for t in KVCacheLayoutType)
                raise LayoutError(f"KVCacheLayout.type: unknown layout {type!r}; use one of {names}") from None
        if not isinstance(type, KVCacheLayoutType):
            raise LayoutError(f"KVCacheLayout.type must be a KVCacheLayoutType or its name, got {type!r}")
        self.type = type
        given = {"num_layer": num_layer, "num_block": num_block, "tokens_per_block": tokens_per_block,
                 "num_head": num_head, "head_size": head_size, "num_kv_heads": num_kv_heads}
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"KVCacheLayout.{name} must be a positive int, got {value!r}")
            setattr(self, name, value)
        if kv_dim is None:
            kv_dim = 1 if is_mla else 2
        elif isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim not in (1, 2):
            hint = " (the 7th argument is kv_dim, as in the original FlexKV; pass is_mla=True by keyword)" \
                if isinstance(kv_dim, bool) else ""
            raise LayoutError(f"KVCacheLayout.kv_dim must be 1 (MLA: one latent per token) or 2 (K and V), got "
                              f"{kv_dim!r}{hint}")
        elif is_mla is not None and bool(is_mla) != (kv_dim == 1):
            raise LayoutError(f"KVCacheLayout: kv_dim={kv_dim} and is_mla={is_mla!r} disagree; give one of them")
        self.kv_dim = kv_dim

    @property
    def is_mla(self) -> bool:
        """One latent per token (``kv_dim == 1``)."""
        return self.kv_dim == 1

    @is_mla.setter
    def is_mla(self, value: bool) -> None:
        self.kv_dim = 1 if value else 2

    def _with(self, **changes: int) -> KVCacheLayout:
        args = {"type": self.type, "num_layer": self.num_layer, "num_block": self.num_block,
                "tokens_per_block": self.tokens_per_block, "num_head": self.num_head, "head_size": self.head_size,
                "kv_dim": self.kv_dim, "num_kv_heads": self.num_kv_heads}
        args.update(changes)
        return KVCacheLayout(**args)

    def div_head(self, num_chunks: int) -> KVCacheLayout:
        """This layout with ``num_head / num_chunks`` heads (one tensor-parallel rank's share)."""
        if self.num_head % num_chunks:
            raise LayoutError(f"num_head {self.num_head} is not divisible by {num_chunks}")
        return self._with(num_head=self.num_head // num_chunks)

    def div_layer(self, num_chunks: int) -> KVCacheLayout:
        """This layout with ``num_layer / num_chunks`` layers (one pipeline stage's share)."""
        if self.num_layer % num_chunks:
            raise LayoutError(f"num_layer {self.num_layer} is not divisible by {num_chunks}")
        return self._with(num_layer=self.num_layer // num_chunks)

    @property
    def kv_shape(self) -> tuple[int, ...]:
        """The whole cache's shape, layers included."""
        L, B, kv, t, H, D = (self.num_layer, self.num_block, self.kv_dim,
                             self.tokens_per_block, self.num_head, self.head_size)
        if self.type is KVCacheLayoutType.LAYERFIRST:
            return (L, kv, B, t, H, D)
        if self.type is KVCacheLayoutType.BLOCKFIRST:
            return (B, L, kv, t, H, D)
        return (L, B, kv, t, H, D)

    def get_chunk_size(self) -> int:
        """Elements of one block of one layer's K (or V)."""
        return self.tokens_per_block * self.num_head * self.head_size

    def get_elements_per_block(self) -> int:
        return self.num_layer * self.kv_dim * self.get_chunk_size()

    def get_total_elements(self) -> int:
        return math.prod(self.kv_shape)

    def get_block_stride(self) -> int:
        s = self.kv_shape
        if self.type is KVCacheLayoutType.LAYERFIRST:
            return math.prod(s[3:])
        if self.type is KVCacheLayoutType.BLOCKFIRST:
            return math.prod(s[1:])
        return math.prod(s[2:])

    def get_layer_stride(self) -> int:
        s = self.kv_shape
        if self.type is KVCacheLayoutType.BLOCKFIRST:
            return math.prod(s[2:])
        return math.prod(s[1:])

    def get_kv_stride(self) -> int:
        s = self.kv_shape
        if self.type is KVCacheLayoutType.LAYERFIRST:
            return math.prod(s[2:])
        return math.prod(s[3:])


@dataclass(frozen=True)
class TensorInfo:
    """What the copy engine needs to know of a torch tensor or numpy array."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    device: str
    contiguous: bool


def tensor_info(t: Any, what: str = "tensor") -> TensorInfo:
    if isinstance(t, np.ndarray):
        return TensorInfo(t.ctypes.data, tuple(t.shape), tuple(t.strides), t.itemsize, "cpu",
                          bool(t.flags.c_contiguous))
    if hasattr(t, "data_ptr") and hasattr(t, "element_size"):
        es = int(t.element_size())
        return TensorInfo(int(t.data_ptr()), tuple(int(x) for x in t.shape), tuple(int(s) * es for s in t.stride()),
                          es, str(t.device), bool(t.is_contiguous()))
    raise LayoutError(f"{what} must be a torch.Tensor or numpy.ndarray, got {type(t).__name__}")


@dataclass
class EngineLayout:
    """An engine's KV memory as copy segments: rows of [base, block_stride, host_offset, bytes] (bytes)."""

    segments: np.ndarray
    num_blocks: int
    block_bytes: int  # bytes of a whole host block (all TP ranks)
    description: str = ""
    keepalive: list[Any] = field(default_factory=list, repr=False)
    device: str = "cpu"  # where the engine's KV memory is: "cpu" or "cuda:<index>"
    layers: np.ndarray | None = None  # per segment, the last layer it holds (layer-wise copies); None: all 0
    tp_size: int = 1
    tp_rank: int = 0

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def cuda_index(self) -> int:
        return int(self.device.split(":")[1]) if ":" in self.device else 0

    def grouped_segments(self) -> np.ndarray:
        """The segments with a fifth column, the layer group a layer-wise copy completes them in."""
        seg = np.asarray(self.segments, dtype=np.int64)
        groups = np.zeros(len(seg), dtype=np.int64) if self.layers is None else np.asarray(self.layers, np.int64)
        return np.ascontiguousarray(np.column_stack([seg, groups]))

    def validate(self) -> None:
        """Checks that the segments tile a host block (this rank's slice of it) exactly and that blocks do not
        overlap in the engine."""
        seg = np.asarray(self.segments, dtype=np.int64)
        if seg.ndim != 2 or seg.shape[1] != 4 or len(seg) == 0:
            raise LayoutError("EngineLayout.segments must be a non-empty (n, 4) array of "
                              "[engine_base, engine_block_stride, host_offset, bytes]")
        if self.num_blocks < 1:
            raise LayoutError(f"EngineLayout.num_blocks must be positive, got {self.num_blocks}")
        if self.layers is not None and len(self.layers) != len(seg):
            raise LayoutError(f"EngineLayout.layers has {len(self.layers)} entries for {len(seg)} segments")
        base, stride, offset, nbytes = seg.T
        if (base <= 0).any() or (nbytes <= 0).any() or (offset < 0).any():
            raise LayoutError("EngineLayout: every segment needs a non-null base, a non-negative host offset and "
                              "a positive size")
        if self.num_blocks > 1 and (np.abs(stride) < nbytes).any():
            raise LayoutError("EngineLayout: a segment's block stride is smaller than its size, so engine blocks "
                              "would overlap")
        order = np.argsort(offset, kind="stable")
        ends = offset[order] + nbytes[order]
        if self.tp_size == 1:
            if offset[order][0] != 0 or (offset[order][1:] != ends[:-1]).any() or ends[-1] != self.block_bytes:
                raise LayoutError(f"EngineLayout: the segments must cover each host block's {self.block_bytes} "
                                  "bytes exactly once (no gap, no overlap), or a block could be stored half written")
        elif (offset[order][1:] < ends[:-1]).any() or ends[-1] > self.block_bytes or \
                int(nbytes.sum()) * self.tp_size != self.block_bytes:
            raise LayoutError(f"EngineLayout: TP rank {self.tp_rank}'s segments must cover 1/{self.tp_size} of each "
                              f"host block's {self.block_bytes} bytes without overlap")

    @classmethod
    def from_block_views(cls, views: Sequence[Any], description: str = "block views", *,
                         layers: Sequence[int] | None = None, tp_size: int = 1, tp_rank: int = 0) -> EngineLayout:
        """Builds a layout from tensors whose dim 0 is the block id and whose view[b] is contiguous.

        ``layers[i]`` is the layer view i belongs to (the last one, if it spans several), for layer-wise
        loading; without it every view completes with the whole copy. With ``tp_size`` > 1 the views are
        TP rank ``tp_rank``'s heads and take that rank's slice of each host chunk.
        """
        if len(views) == 0:
            raise LayoutError("register_kv_caches: no KV tensors given")
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise LayoutError(f"tp_rank must lie in [0, tp_size), got tp_rank={tp_rank!r} tp_size={tp_size!r}")
        if layers is not None and len(layers) != len(views):
            raise LayoutError(f"layers has {len(layers)} entries for {len(views)} KV views; give one layer per view")
        rows: list[list[int]] = []
        num_blocks = None
        device = None
        offset = 0
        for i, v in enumerate(views):
            info = tensor_info(v, f"kv_caches[{i}]")
            if info.device != "cpu" and not info.device.startswith("cuda"):
                raise LayoutError(f"kv_caches[{i}] lives on {info.device}; FlexKV moves KV memory on the CPU or on "
                                  "a CUDA device")
            if device is None:
                device = info.device
            elif info.device != device:
                raise LayoutError(f"kv_caches[{i}] lives on {info.device}, kv_caches[0] on {device}; register the KV "
                                  "tensors of one device per KVManager (one per TP rank)")
            if len(info.shape) < 1 or info.shape[0] < 1:
                raise LayoutError(f"kv_caches[{i}] has shape {info.shape}; dim 0 must be the block id")
            if num_blocks is None:
                num_blocks = info.shape[0]
            elif info.shape[0] != num_blocks:
                raise LayoutError(f"kv_caches[{i}] has {info.shape[0]} blocks, kv_caches[0] has {num_blocks}")
            inner = info.shape[1:]
            inner_bytes = math.prod(inner) * info.itemsize
            expected = info.itemsize
            for dim, stride in zip(reversed(inner), reversed(info.strides[1:])):
                if dim > 1 and stride != expected:
                    raise LayoutError(
                        f"kv_caches[{i}]: one block is not contiguous (shape {info.shape}, byte strides "
                        f"{info.strides}); pass a tensor whose [block] slice is contiguous")
                expected *= dim
            rows.append([info.ptr, info.strides[0], offset + tp_rank * inner_bytes, inner_bytes,
                         i if layers is None else int(layers[i])])
            offset += inner_bytes * tp_size
        merged = _merge_adjacent(np.array(rows, dtype=np.int64))
        return cls(np.ascontiguousarray(merged[:, :4]), int(num_blocks), offset, description, list(views),
                   device=str(device), layers=None if layers is None else merged[:, 4].copy(), tp_size=tp_size,
                   tp_rank=tp_rank)

    @classmethod
    def from_kv_layout(cls, kv_caches: Any, kv_layout: KVCacheLayout, *, tp_size: int = 1,
                       tp_rank: int = 0) -> EngineLayout:
        """Builds a layout from FlexKV's KVCacheLayout and a list of per-layer tensors or one tensor.
        With tensor parallelism, ``kv_layout.num_head`` is the heads of one rank."""
        lay = kv_layout
        per_layer_shape = {
            KVCacheLayoutType.LAYERFIRST: (lay.kv_dim, lay.num_block, lay.tokens_per_block, lay.num_head,
                                           lay.head_size),
            KVCacheLayoutType.LAYERBLOCK: (lay.num_block, lay.kv_dim, lay.tokens_per_block, lay.num_head,
                                           lay.head_size),
        }
        if isinstance(kv_caches, (list, tuple)):
            tensors = list(kv_caches)
        else:
            tensors = [kv_caches]
        infos = [tensor_info(t, f"kv_caches[{i}]") for i, t in enumerate(tensors)]
        if lay.type is not KVCacheLayoutType.BLOCKFIRST and len(tensors) == lay.num_layer and \
                any(tuple(info.shape) != per_layer_shape[lay.type] for info in infos):
            raw = _block_major_views(tensors, infos, lay)
            if raw is not None:  # vLLM's packed and 3-D MLA layouts: one dense block per row, any order inside
                return cls.from_block_views(raw, f"{lay.type.value} {lay.num_layer} x {infos[0].shape} (block-major)",
                                            layers=list(range(lay.num_layer)), tp_size=tp_size, tp_rank=tp_rank)
        for i, info in enumerate(infos):
            if not info.contiguous:
                raise LayoutError(f"kv_caches[{i}] is not contiguous; pass contiguous KV tensors")

        if lay.type is KVCacheLayoutType.BLOCKFIRST:
            if len(tensors) != 1:
                raise LayoutError(f"a BLOCKFIRST layout is one tensor of shape {lay.kv_shape}, got {len(tensors)}")
            _expect_shape(infos[0], lay.kv_shape, "kv_caches")
            # One view per (layer, k|v): a TP rank's slice of each lands where the host block layout puts it.
            # With one rank they are adjacent in both places and merge into one segment.
            pool = tensors[0]
            views = [pool[:, layer, k] for layer in range(lay.num_layer) for k in range(lay.kv_dim)]
            return cls.from_block_views(views, f"BLOCKFIRST {lay.kv_shape}",
                                        layers=[layer for layer in range(lay.num_layer) for _ in range(lay.kv_dim)],
                                        tp_size=tp_size, tp_rank=tp_rank)

        layer_shape = per_layer_shape[lay.type]
        if len(tensors) == 1 and len(infos[0].shape) == 6:
            _expect_shape(infos[0], lay.kv_shape, "kv_caches")
            tensors = [tensors[0][i] for i in range(lay.num_layer)]
        elif len(tensors) != lay.num_layer:
            raise LayoutError(f"kv_layout says {lay.num_layer} layers, got {len(tensors)} per-layer tensors")
        else:
            for i, info in enumerate(infos):
                _expect_shape(info, layer_shape, f"kv_caches[{i}]")
        if lay.type is KVCacheLayoutType.LAYERBLOCK:  # K and V of a block are adjacent: merged when tp_size is 1
            views = [t[:, k] for t in tensors for k in range(lay.kv_dim)]
        else:
            views = [t[k] for t in tensors for k in range(lay.kv_dim)]
        return cls.from_block_views(views, f"{lay.type.value} {lay.num_layer} x {layer_shape}",
                                    layers=[layer for layer in range(lay.num_layer) for _ in range(lay.kv_dim)],
                                    tp_size=tp_size, tp_rank=tp_rank)


def _block_major_views(tensors: list[Any], infos: list[TensorInfo], lay: KVCacheLayout) -> list[Any] | None:
    """Per-layer tensors whose dim 0 is the block and whose other dims tile each block densely (in any order:
    vLLM's packed K|V heads ``(blocks, heads, tokens, 2 * head)`` permuted, its 3-D MLA ``(blocks, tokens,
    latent)``), as ``(blocks, elements)`` views of the same memory; None when they are not of that kind. A block
    of one layer moves as a whole, so the order inside it does not matter."""
    if lay.type is KVCacheLayoutType.LAYERFIRST and lay.kv_dim != 1:
        return None  # K and V are separate planes (dim 0 is k|v, not the block)
    per_block = lay.kv_dim * lay.tokens_per_block * lay.num_head * lay.head_size
    views = []
    for t, info in zip(tensors, infos):
        if len(info.shape) < 2 or info.shape[0] != lay.num_block or math.prod(info.shape[1:]) != per_block:
            return None
        expected = info.itemsize
        for dim, stride in sorted(zip(info.shape[1:], info.strides[1:]), key=lambda p: p[1]):
            if dim > 1 and stride != expected:
                return None
            expected *= dim
        if lay.num_block > 1 and info.strides[0] < expected:
            return None
        if isinstance(t, np.ndarray):
            views.append(np.lib.stride_tricks.as_strided(t, (lay.num_block, per_block),
                                                         (info.strides[0], info.itemsize)))
        else:
            views.append(t.as_strided((lay.num_block, per_block), (info.strides[0] // info.itemsize, 1)))
    return views


def _expect_shape(info: TensorInfo, shape: tuple[int, ...], what: str) -> None:
    if tuple(info.shape) != tuple(shape):
        raise LayoutError(f"{what} has shape {tuple(info.shape)}, but kv_layout describes {tuple(shape)}")


def _merge_adjacent(rows: np.ndarray) -> np.ndarray:
    """Merges segments that are contiguous both in the engine and in the host block; a merged segment
    belongs to the last layer it holds. Rows are [base, stride, host offset, bytes, layer]."""
    merged: list[list[int]] = []
    for base, stride, off, nbytes, layer in rows.tolist():
        if merged:
            pb, ps, po, pn, pl = merged[-1]
            if stride == ps and base == pb + pn and off == po + pn:
                merged[-1][3] += nbytes
                merged[-1][4] = max(pl, layer)
                continue
        merged.append([base, stride, off, nbytes, layer])
    return np.array(merged, dtype=np.int64)


def model_layout(kv_caches: Any, kv_layout: KVCacheLayout | None, model: Any, tokens_per_block: int) -> EngineLayout:
    """The engine layout of KV memory registered for ``model`` (a ModelConfig): tensors described by
    ``kv_layout``, or an EngineLayout given as ``kv_caches`` (``kv_layout`` None). LayoutError names the
    first thing that does not match the model."""
    from .config import canonical_dtype_name

    if isinstance(kv_caches, EngineLayout):
        if kv_layout is not None:
            raise LayoutError("register_kv_caches: give either an EngineLayout or tensors with a kv_layout")
        layout = kv_caches
    elif isinstance(kv_layout, KVCacheLayout):
        if kv_layout.tokens_per_block != tokens_per_block:
            raise LayoutError(f"kv_layout.tokens_per_block is {kv_layout.tokens_per_block} but "
                              f"cache_config.tokens_per_block is {tokens_per_block}; they must be equal")
        if kv_layout.num_layer != model.num_layers or kv_layout.is_mla != model.use_mla:
            raise LayoutError(f"kv_layout ({kv_layout.num_layer} layers, mla={kv_layout.is_mla}) does not match "
                              f"model_config ({model.num_layers} layers, use_mla={model.use_mla})")
        layout = EngineLayout.from_kv_layout(kv_caches, kv_layout)
        for i, t in enumerate(kv_caches if isinstance(kv_caches, (list, tuple)) else [kv_caches]):
            got = canonical_dtype_name(t.dtype, f"kv_caches[{i}].dtype")
            if got != model.dtype_name:
                raise LayoutError(f"kv_caches[{i}] has dtype {got}, model_config.dtype is {model.dtype_name}; "
                                  "register the tensors the model writes")
    else:
        raise LayoutError("register_kv_caches: kv_layout must be a flexkv KVCacheLayout "
                          f"(got {type(kv_layout).__name__}); or pass an EngineLayout as kv_caches")
    slices = 1 if model.use_mla else model.tp_size  # MLA: every rank holds the whole latent
    if getattr(layout, "tp_size", 1) != slices:
        raise LayoutError(f"model_config.tp_size is {model.tp_size}: register one rank's slice as an EngineLayout "
                          f"built with tp_size={slices} and that rank's tp_rank (EngineLayout.from_kv_layout(..., "
                          "tp_size=, tp_rank=)), in that rank's process")
    block_bytes = model.block_bytes(tokens_per_block)
    if layout.block_bytes != block_bytes:
        raise LayoutError(f"the registered KV memory holds {layout.block_bytes} bytes per block, but model_config "
                          f"and tokens_per_block={tokens_per_block} give {block_bytes}; check "
                          "num_layers, num_kv_heads, head_size, dtype and use_mla")
    return layout
