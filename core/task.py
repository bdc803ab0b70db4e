"""Tasks: one get, put or prefetch, from match to its final state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .request import KVResponseStatus


class TaskType(Enum):
    GET = "get"
    PUT = "put"
    PREFETCH = "prefetch"


class TaskState(Enum):
    UNREADY = "unready"      # matched; its blocks are locked; waits for launch() with slot mappings
    RUNNING = "running"      # claimed by launch or cancel; bytes may be moving
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in _FINAL_STATUS


_FINAL_STATUS = {
    TaskState.COMPLETED: KVResponseStatus.SUCCESS,
    TaskState.CANCELLED: KVResponseStatus.CANCELLED,
    TaskState.FAILED: KVResponseStatus.FAILED,
}


@dataclass
class Task:
    """A task's plan. ``host_ids[i]`` is the CPU block that block ``copy_blocks[i]`` of the sequence moves
    to or from. ``held`` are the CPU blocks the task holds locked until it ends (for a get, also blocks it
    promotes from SSD but the engine already has). ``seq_len`` is the number of tokens the match was asked
    about; ``promised`` the number of blocks its mask offered (the slots launch() must get)."""

    id: int
    type: TaskType
    seq_len: int
    copy_blocks: np.ndarray
    host_ids: np.ndarray
    held: np.ndarray
    tokens_per_block: int
    chain: Any = None            # tiering.Chain: what the SSD tier needs of the request
    promotion: Any = None        # tiering.Promotion while blocks come up from SSD
    plan: np.ndarray | None = None  # engine blocks of a launched get waiting for its promotion
    end_requested: tuple[TaskState, str | None] | None = None  # how to end it once its promotion is done
    background: int = 0          # write-throughs to slower tiers still running
    state: TaskState = TaskState.UNREADY
    job_id: int = 0
    layerwise: bool = False  # the copy completes layer by layer (KVManager.wait_layer)
    external: bool = False   # another process copies the bytes (KVManager.take_external)
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    launched: float = 0.0  # when launch() took it; 0 while not launched
    finished: float = 0.0
    promised: int = -1

    def __post_init__(self) -> None:
        if self.promised < 0:
            self.promised = len(self.copy_blocks)

    @property
    def num_tokens(self) -> int:
        """Tokens the task's mask offered: the slots launch() must be given."""
        return self.promised * self.tokens_per_block

    def launchable(self) -> bool:
        """Matched and not launched yet (a task with nothing to copy is complete from the start)."""
        if self.launched:
            return False
        return self.state is TaskState.UNREADY or (self.state is TaskState.COMPLETED and self.promised == 0)

    def response_status(self) -> KVResponseStatus:
        return _FINAL_STATUS[self.state]

    def token_mask(self) -> np.ndarray:
        """A new bool array over the sequence, True for the tokens of the blocks the task moves (moved, once
        it has ended: a failed task's blocks are trimmed to those that arrived)."""
        mask = np.zeros(self.seq_len, dtype=bool)
        tpb = self.tokens_per_block
        whole = self.seq_len // tpb
        mask[: whole * tpb].reshape(whole, tpb)[self.copy_blocks] = True
        return mask
