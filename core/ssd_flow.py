"""How KVManager moves a task's blocks between the CPU and SSD tiers around its copies.

A mixin of KVManager: the methods run on its SSD threads and use its lock,
counters and task table. Promotion brings a get's (or prefetch's) SSD-only
blocks into the CPU tier and then hands the get to the copy engine;
write-through sends a completed put's blocks to SSD.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .cpu_tier import CpuTier
from .errors import TaskError
from .task import Task, TaskState, TaskType
from .tiering import Chain, TierCounters, abandon_promotion, run_promotion, write_through

logger = logging.getLogger("flexkv")

_WRITE_THROUGH_ATTEMPTS = 8
_EMPTY_IDS = np.zeros(0, dtype=np.int32)


class SsdFlow:
    """Promotion and write-through for KVManager (see kv_manager.py for the state they share)."""

    _cond: Any
    _tier: Any
    _ssd: Any
    _ssd_reads: Any
    _ssd_writes: Any
    _closing: bool
    _promoting: int
    _write_backlog: int
    _write_backlog_limit: int
    stats: Any

    def _start_promotion(self, task: Task) -> None:
        with self._cond:
            closing = self._closing
            if not closing:
                self._promoting += 1
        if closing:  # shutdown() has begun: give the blocks back instead of reading them
            assert self._tier is not None and self._ssd is not None
            abandon_promotion(self._tier, self._ssd, task.promotion)
            with self._cond:
                task.held = task.held[: len(task.held) - len(task.promotion.cpu_ids)]
                task.promotion = None
                task.state = TaskState.RUNNING
            self._finish(task, TaskState.CANCELLED, "KVManager is shutting down")
            return
        assert self._ssd_reads is not None
        self._ssd_reads.submit(self._promote, task)

    def _promote(self, task: Task) -> None:
        """Runs on the SSD read thread: brings the task's SSD blocks up, then lets its copy start."""
        try:
            self._promote_and_hand_over(task)
        finally:
            with self._cond:
                self._promoting -= 1
                self._cond.notify_all()

    def _promote_and_hand_over(self, task: Task) -> None:
        tier, ssd, p = self._tier, self._ssd, task.promotion
        assert tier is not None and ssd is not None and p is not None
        counters = TierCounters()
        end = run_promotion(tier, ssd, task.chain, p, counters)
        with self._cond:
            for name, value in vars(counters).items():
                setattr(self.stats, name, getattr(self.stats, name) + value)
            # Blocks from `end` on did not arrive: their CPU locks are gone; the load shrinks to what did.
            arrived = len(task.held) - (p.stop - end)
            task.held = task.held[:arrived]
            first = int(task.copy_blocks[0]) if len(task.copy_blocks) else p.start
            keep = max(0, end - first)
            task.copy_blocks = task.copy_blocks[:keep]
            task.host_ids = task.host_ids[:keep]
            task.promotion = None
            if end < p.stop:
                task.error = f"{p.stop - end} block(s) promised from the SSD tier did not arrive"
            if task.end_requested is not None:
                self._finish(task, *task.end_requested)
            elif task.type is TaskType.PREFETCH:
                self._finish(task, TaskState.FAILED if task.error else TaskState.COMPLETED, task.error)
            elif task.plan is not None:
                plan, task.plan = task.plan, None
                try:
                    self._submit([task], [plan])
                except TaskError:
                    pass  # _submit ended the task FAILED and logged why
            self._cond.notify_all()

    def _commit_put(self, tier: CpuTier, task: Task) -> None:
        """Makes a completed put's blocks ready and, with an SSD tier, queues their write-through. While
        few blocks wait for the SSD, they stay locked until written, so eviction cannot take them first;
        past that they are queued unlocked, and eviction may take some before the SSD gets them."""
        chain, n = task.chain, int(task.copy_blocks[-1]) + 1 if len(task.copy_blocks) else 0
        if self._ssd_writes is None or chain is None or n == 0:
            tier.index.commit(task.held)
            return
        with self._cond:
            hold = self._write_backlog + len(task.held) <= self._write_backlog_limit
            own = task.held if hold else _EMPTY_IDS
            self._write_backlog += len(own)
            task.background += 1
        try:
            if hold:
                tier.index.set_ready(task.held, True)  # readable now; unlocked once on SSD
            else:
                tier.index.commit(task.held)
        except Exception:
            with self._cond:
                self._write_backlog -= len(own)
                task.background -= 1
            raise
        self._ssd_writes.submit(self._write_through, task, chain, n, own)

    def _write_through(self, task: Task, chain: Chain, n: int, own: np.ndarray) -> None:
        """Runs on the SSD write thread. A put whose prefix another put is still storing waits for it a
        little; after that its blocks stay CPU-only."""
        tier, ssd = self._tier, self._ssd
        counters = TierCounters()
        try:
            if tier is not None and ssd is not None:
                # Held blocks cannot be evicted, so a gap before them is another put still storing: wait
                # for it a little. Unheld ones may be evicted already: write what is there at once.
                for attempt in range(_WRITE_THROUGH_ATTEMPTS if len(own) else 1):
                    if write_through(tier, ssd, chain, n, counters, whole=len(own) > 0):
                        break
                    time.sleep(0.002 * (attempt + 1))
                else:
                    counters.ssd_write_skipped_blocks += len(own)
        except Exception as e:  # a failed write-through only costs an SSD copy
            logger.error("SSD tier: write-through of task %d failed: %s", task.id, e)
        finally:
            if tier is not None and len(own):
                tier.index.release(own)
            with self._cond:
                for name, value in vars(counters).items():
                    setattr(self.stats, name, getattr(self.stats, name) + value)
                self._write_backlog -= len(own)
                task.background -= 1
                self._cond.notify_all()
