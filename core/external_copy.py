"""Tasks whose bytes another process copies: the engine's worker process, when the KVManager runs in the
engine's scheduler process (vLLM with a separate worker, for example).

The scheduler matches as usual, then ``take_external`` claims the task and hands back which CPU blocks to
copy, and ``finish_external`` ends it once the worker reports the copy done: a completed put makes its
blocks ready (and writes them through to SSD), every other end unlocks them. The worker maps the CPU
tier (``tier_info``) and copies with ``flexkv.core.data_plane.DataPlane``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .errors import TaskError
from .task import TaskState


class ExternalCopy:
    """KVManager's methods for copies done by another process (a mixin: it uses the manager's state)."""

    def tier_info(self: Any) -> dict[str, Any]:
        """What a worker process needs to map the CPU tier: its shared-memory name and geometry."""
        tier = self._require_started()
        return {"shm_name": tier.shm_name, "num_blocks": tier.num_blocks, "block_stride": tier.block_stride,
                "block_bytes": tier.block_bytes}

    def take_external(self: Any, task_id: int, timeout: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
        """Claims a matched task for a copy done elsewhere; returns (index in the sequence of each block to
        copy, its CPU block id). Waits up to ``timeout`` seconds for blocks the get brings up from SSD;
        blocks that did not arrive are left out. Call finish_external when the copy has ended."""
        task = self._claim_for_launch([task_id])[0]
        try:
            deadline = time.monotonic() + timeout
            with self._cond:
                task.external = True
                while task.promotion is not None and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                if task.promotion is not None:
                    task.end_requested = (TaskState.FAILED, "the SSD tier did not deliver in time")
                    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
                if task.state.final:
                    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
                return task.copy_blocks.copy(), task.host_ids.copy()
        finally:
            with self._cond:
                self._launching -= 1
                self._cond.notify_all()

    def finish_external(self: Any, task_id: int, ok: bool, error: str | None = None) -> None:
        """Ends a task claimed by take_external; nobody waits for it afterwards."""
        with self._cond:
            task = self._tasks.get(task_id)
            if task is None:
                raise TaskError(f"finish_external: unknown task id {task_id}")
            if not task.state.final and not (task.state is TaskState.RUNNING and task.external):
                raise TaskError(f"finish_external: task {task_id} was not taken by take_external")
            if task.promotion is not None:  # its SSD reads still write into its CPU blocks: they end it
                if task.end_requested is None:
                    task.end_requested = (TaskState.COMPLETED if ok else TaskState.FAILED, error)
                return
        if not task.state.final:
            self._finish(task, TaskState.COMPLETED if ok else TaskState.FAILED, error)
        with self._cond:
            self._tasks.pop(task_id, None)
