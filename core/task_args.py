"""Checks of the task API's arguments (token arrays, masks, slot mappings, task ids, streams), shared by the
facades. Each failure is a TaskError naming the argument and what it must be."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from flexkv import _core

from .errors import TaskError
from .request import KVResponse, KVResponseStatus

_STATUS = {_core.ReportStatus.SUCCESS: KVResponseStatus.SUCCESS, _core.ReportStatus.NOTFOUND: KVResponseStatus.NOTFOUND,
           _core.ReportStatus.UNREADY: KVResponseStatus.UNREADY, _core.ReportStatus.TIMEOUT: KVResponseStatus.TIMEOUT,
           _core.ReportStatus.CANCELLED: KVResponseStatus.CANCELLED, _core.ReportStatus.FAILED: KVResponseStatus.FAILED}
_ENDED = (_core.ReportStatus.SUCCESS, _core.ReportStatus.FAILED, _core.ReportStatus.CANCELLED)


def is_tensor(x: Any) -> bool:
    return hasattr(x, "numpy") and hasattr(x, "dtype") and hasattr(x, "device")


def as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if is_tensor(x):
        if str(x.device) != "cpu":
            raise TaskError(f"{what} must be on the CPU, got a tensor on {x.device}")
        return x.detach().numpy()
    try:
        return np.asarray(x)
    except Exception as e:
        raise TaskError(f"{what} must be an array, got {type(x).__name__}") from e


def task_ids(ids: int | Iterable[int], unique: bool = True) -> list[int]:
    """Task ids as a list in the order given, without repeats when unique."""
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    try:
        out = [int(t) for t in ids]
    except (TypeError, ValueError) as e:
        raise TaskError(f"task_ids must be an int or a list of ints, got {ids!r}") from e
    return list(dict.fromkeys(out)) if unique else out


def check_tokens(token_ids: Any, token_mask: Any, tokens_per_block: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Validates a request; returns (int64 tokens, bool mask or None for all, index of the first block asked
    for). A block partly asked for counts as asked; with nothing asked, the index is past the last block."""
    tokens = as_array(token_ids, "token_ids")
    if tokens.ndim != 1:
        raise TaskError(f"token_ids must be 1-D, got shape {tokens.shape}")
    if tokens.dtype.kind not in "iu":
        raise TaskError(f"token_ids must be integers, got dtype {tokens.dtype}")
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if token_mask is None:
        return tokens, None, 0
    mask = as_array(token_mask, "token_mask")
    if mask.dtype != np.bool_:
        raise TaskError(f"token_mask must be a bool array, got dtype {mask.dtype}")
    if mask.shape != tokens.shape:
        raise TaskError(f"token_mask has shape {mask.shape}, token_ids {tokens.shape}; they must match")
    start = int(np.argmax(mask)) if len(mask) else 0
    if len(mask) == 0 or not mask[start]:
        return tokens, mask, len(tokens) // tokens_per_block + 1
    if not mask[start:].all():
        raise TaskError("token_mask must be False for a prefix of tokens and True for the rest")
    return tokens, mask, start // tokens_per_block


def check_flag(call: str, name: str, value: Any, position: int, instead: str) -> None:
    """A bool argument; a value of another type (an argument in the wrong place) fails naming the parameter."""
    if not isinstance(value, (bool, np.bool_)):
        hint = f"; pass {instead}" if instead else ""
        raise TaskError(f"{call}: argument {position} is {name} (the original FlexKV's order), which must be a bool; "
                        f"got {value!r} ({type(value).__name__}){hint}")


def per_token_slots(slots: np.ndarray, tokens_per_block: int, start: int = 0) -> np.ndarray:
    """Slots of the original FlexKV's convention (every token of a block given the block's first slot, as its
    vLLM adapter and tests pass them) as one slot per token; slots already per token are returned as they are.
    ``start`` is the sequence index of the first slot's token. The two conventions never read alike: per-token
    slots of a block differ from each other, and a block's first slot is a multiple of ``tokens_per_block``."""
    n = len(slots)
    if n < 2 or tokens_per_block < 2:
        return slots
    pos = start + np.arange(n)
    offset = pos % tokens_per_block
    first = np.flatnonzero((offset == 0) | (np.arange(n) == 0))  # index of each block's first given slot
    base = np.repeat(slots[first], np.diff(np.append(first, n)))
    if not np.array_equal(slots, base) or (base % tokens_per_block).any():
        return slots
    return slots + offset


def slot_target(slots: Any, tokens_per_block: int = 1) -> np.ndarray | str:
    """A slot mapping as a contiguous int64 array, one slot per token, or why it cannot be one (the control
    plane then fails the launch, after it has claimed the launch's tasks)."""
    try:
        s = as_array(slots, "slot_mapping")
    except TaskError as e:
        return str(e)
    if s.ndim != 1 or s.dtype.kind not in "iu":
        return f"slot_mapping must be a 1-D integer array, got shape {s.shape} dtype {s.dtype}"
    return per_token_slots(np.ascontiguousarray(s, dtype=np.int64), tokens_per_block)


def whole_block_slots(tokens: np.ndarray, mask_in: np.ndarray | None, first: int, slot_mapping: Any,
                      tokens_per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """For get_async / put_async: (the mask, one slot per token of the sequence, -1 where none). Slots are
    given for the tokens ``mask_in`` marks; when it starts inside a block, that block's leading slots follow
    from the first given slot (a block's slots are consecutive)."""
    if mask_in is None:
        mask_in = np.ones(len(tokens), dtype=bool)
    slots = as_array(slot_mapping, "slot_mapping")
    if slots.ndim != 1 or len(slots) != int(mask_in.sum()) or not np.issubdtype(slots.dtype, np.integer):
        raise TaskError(f"slot_mapping has shape {slots.shape} dtype {slots.dtype}; it must hold one integer slot "
                        f"per token that token_mask marks ({int(mask_in.sum())})")
    full = np.full(len(tokens), -1, dtype=np.int64)
    if len(slots):
        start = int(np.argmax(mask_in))
        slots = per_token_slots(slots.astype(np.int64, copy=False), tokens_per_block, start)
    full[mask_in] = slots
    if len(slots):
        lead = np.arange(first * tokens_per_block, start)
        full[lead] = full[start] - (start - lead)
    return mask_in, full


def stream_handle(stream: Any) -> int:
    """A cudaStream_t as int, from a torch.cuda.Stream (or anything with ``cuda_stream``) or an int."""
    handle = getattr(stream, "cuda_stream", stream)
    if isinstance(handle, bool) or not isinstance(handle, (int, np.integer)):
        raise TaskError(f"stream must be a torch.cuda.Stream or a cudaStream_t as int, got {type(stream).__name__}")
    return int(handle)


def namespace_parts(namespace: Any) -> list[str]:
    """A request's salts: None, one string, or a sequence of strings."""
    if namespace is None:
        return []
    if isinstance(namespace, str):
        return [namespace]
    return [str(n) for n in namespace]



def hashes_array(block_hashes: Any) -> np.ndarray:
    """Engine block hashes as an (n, 2) uint64 array of their first 128 bits: bytes of at least 16 bytes (vLLM's
    BlockHash), ints, or an (n, 2) uint64 array."""
    if isinstance(block_hashes, np.ndarray) and block_hashes.dtype == np.uint64 and block_hashes.ndim == 2:
        return np.ascontiguousarray(block_hashes)
    if isinstance(block_hashes, list) and block_hashes and isinstance(block_hashes[0], bytes):
        # vLLM's BlockHash list. join (a C loop) raises TypeError unless every hash is bytes-like; numpy then
        # keeps the first 16 bytes of each, zero-padded, as the loop below does.
        try:
            b"".join(block_hashes)
            fixed = np.array(block_hashes, dtype="S16")
        except (TypeError, ValueError):
            fixed = None
        if fixed is not None and fixed.shape == (len(block_hashes),):
            return fixed.view("<u8").reshape(-1, 2)
    raw = bytearray()
    for i, h in enumerate(block_hashes):
        if isinstance(h, (bytes, bytearray)):
            b = bytes(h[:16]).ljust(16, b"\0")
        elif isinstance(h, (int, np.integer)):
            b = (int(h) & (2**128 - 1)).to_bytes(16, "little")
        else:
            raise TaskError(f"block_hashes[{i}] must be bytes or an int, got {type(h).__name__}")
        raw += b
    return np.frombuffer(bytes(raw), dtype="<u8").reshape(-1, 2).copy()


def token_mask(seq_len: int, blocks: np.ndarray, tokens_per_block: int) -> np.ndarray:
    """A bool mask over a sequence, True for the tokens of the whole blocks ``blocks``."""
    mask = np.zeros(seq_len, dtype=bool)
    n = len(blocks)
    if n and int(blocks[-1]) - int(blocks[0]) + 1 == n:  # ascending and contiguous (every get): one slice
        mask[int(blocks[0]) * tokens_per_block: (int(blocks[-1]) + 1) * tokens_per_block] = True
    elif n:
        whole = seq_len // tokens_per_block
        mask[: whole * tokens_per_block].reshape(whole, tokens_per_block)[blocks] = True
    return mask


def responses(reports: list[tuple], tokens_per_block: int) -> dict[int, KVResponse]:
    """The control plane's task reports as FlexKV's KVResponses (an ended task's mask of the tokens it moved)."""
    out = {}
    for task, status, seq_len, blocks, error in reports:
        mask = token_mask(seq_len, blocks, tokens_per_block) if status in _ENDED else None
        out[int(task)] = KVResponse(_STATUS[status], int(task), mask, error or None)
    return out
