"""Tasks: one get, put or prefetch, from match to its final state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

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
    to or from; the task holds those CPU blocks locked until it ends. ``seq_len`` is the number of tokens
    the match was asked about."""

    id: int
    type: TaskType
    seq_len: int
    copy_blocks: np.ndarray
    host_ids: np.ndarray
    tokens_per_block: int
    state: TaskState = TaskState.UNREADY
    job_id: int = 0
    error: str | None = None
    created: float = field(default_factory=time.monotonic)
    launched: float = 0.0  # when launch() took it; 0 while not launched
    finished: float = 0.0

    @property
    def num_tokens(self) -> int:
        """Tokens the task moves: whole blocks only."""
        return len(self.copy_blocks) * self.tokens_per_block

    def launchable(self) -> bool:
        """Matched and not launched yet (a task with nothing to copy is complete from the start)."""
        if self.launched:
            return False
        return self.state is TaskState.UNREADY or (self.state is TaskState.COMPLETED and len(self.host_ids) == 0)

    def response_status(self) -> KVResponseStatus:
        return _FINAL_STATUS[self.state]

    def token_mask(self) -> np.ndarray:
        """A new bool array over the sequence, True for the tokens of the blocks the task moves."""
        mask = np.zeros(self.seq_len, dtype=bool)
        tpb = self.tokens_per_block
        whole = self.seq_len // tpb
        mask[: whole * tpb].reshape(whole, tpb)[self.copy_blocks] = True
        return mask
