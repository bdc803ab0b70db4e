"""RemoteFlow: what a facade (KVManager) adds to its requests when the control plane has a remote tier.

- ``lookup``: the blocks the remote index holds after the local tiers' (one Redis round trip);
- ``prefetch`` / ``promote``: remote-only blocks come up into the CPU tier (after any SSD-only ones), in the
  background (a job whose id the facade's wait / try_wait report) or before a get_match;
- ``note_put`` / ``put_ended``: a put that ended well is written through to the remote tier.

Job ids live above ``JOB_BASE``, apart from the control plane's task ids.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from flexkv import _core

from .remote_tier import RemoteTier

logger = logging.getLogger("flexkv")

JOB_BASE = 1 << 52
_PUTS_KEPT = 65536  # puts remembered until their end is reported (older ones are forgotten)
RunOf = Callable[[int], Any]


class RemoteFlow:
    def __init__(self, plane: Any, tier: RemoteTier, tokens_per_block: int) -> None:
        self.plane = plane
        self.tier = tier
        self.tpb = tokens_per_block
        self._ids = itertools.count(JOB_BASE)
        self._jobs: dict[int, tuple[Future[int], int, int]] = {}  # id -> (future, seq_len, first block)
        self._puts: collections.OrderedDict[int, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def is_job(task_id: int) -> bool:
        return task_id >= JOB_BASE

    # ---------------------------------------------------------------------------- lookups and promotion

    def plan(self, run: Any) -> tuple[int, int, int]:
        """(CPU blocks, SSD blocks, remote blocks after the local ones) of a run."""
        cpu, ssd = self.plane.lookup(run)
        local = max(cpu, ssd)
        remote = self.tier.lookup(run.keys[local:]) if local < len(run) else 0
        return cpu, ssd, remote

    def _job(self, run: Any, run_of: RunOf, seq_len: int, cpu: int, ssd: int, remote: int) -> int:
        """Brings the SSD-only blocks up first (the remote ones continue them), then the remote ones."""
        if ssd > cpu:
            task = self.plane.prefetch(run, seq_len)
            self.plane.wait([task], 30.0, False)
            cpu, _ = self.plane.lookup(run)
            if cpu < ssd:  # some SSD blocks did not come up: the remote ones would not continue a cached prefix
                return cpu
        return self.tier.promote(run_of, cpu, remote, seq_len) + cpu

    def prefetch(self, run: Any, run_of: RunOf, seq_len: int) -> int:
        """A prefetch: the control plane's (SSD only) or a job that also promotes remote blocks."""
        cpu, ssd, remote = self.plan(run)
        if remote == 0:
            return int(self.plane.prefetch(run, seq_len))
        job = next(self._ids)
        future = self.tier.submit(self._job, run, run_of, seq_len, cpu, ssd, remote)
        with self._lock:
            self._jobs[job] = (future, seq_len, cpu)
        return job

    def promote(self, run: Any, run_of: RunOf, seq_len: int) -> None:
        """Before a get_match: the remote blocks after the local ones come up now (bounded by the tier's
        timeouts; a fault leaves them out)."""
        cpu, ssd, remote = self.plan(run)
        if remote > 0:
            self._job(run, run_of, seq_len, cpu, ssd, remote)

    # -------------------------------------------------------------------------------------- reports

    def split(self, ids: list[int]) -> tuple[list[int], list[int]]:
        jobs = [i for i in ids if self.is_job(i)]
        return [i for i in ids if not self.is_job(i)], jobs

    def reports(self, jobs: list[int], timeout: float | None) -> list[tuple[Any, ...]]:
        """The control plane's report tuples for jobs; ``timeout`` None leaves out running ones (a timeout
        bounds the wait for all of them together)."""
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in jobs:
            with self._lock:
                entry = self._jobs.get(job)
            if entry is None:
                out.append((job, _core.ReportStatus.NOTFOUND, 0, np.zeros(0, np.int64), ""))
                continue
            future, seq_len, first = entry
            try:
                if deadline is None:
                    end = future.result() if future.done() else None
                else:
                    end = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                end = None
            except Exception as e:  # the job never raises; a crash of its thread is a failed prefetch
                end = -1
                logger.warning("FlexKV remote tier: prefetch job failed: %s", e)
            if end is None:
                if timeout is not None:
                    out.append((job, _core.ReportStatus.TIMEOUT, seq_len, np.zeros(0, np.int64), ""))
                continue
            with self._lock:
                self._jobs.pop(job, None)
            blocks = np.arange(first, max(first, end), dtype=np.int64)
            status = _core.ReportStatus.SUCCESS if end >= 0 else _core.ReportStatus.FAILED
            out.append((job, status, seq_len, blocks, ""))
        return out

    # ----------------------------------------------------------------------------------------- puts

    def note_put(self, task: int, run: Any, covered: int) -> None:
        """Remembers a put until its end is reported: ``covered`` leading blocks are cached once it ends."""
        if covered <= 0:
            return
        with self._lock:
            self._puts[task] = (run, covered)
            while len(self._puts) > _PUTS_KEPT:
                self._puts.popitem(last=False)

    def put_ended(self, task: int, ok: bool) -> None:
        with self._lock:
            entry = self._puts.pop(task, None)
        if entry is not None and ok:
            self.tier.queue_write(*entry)

    def reported(self, reports: list[tuple[Any, ...]]) -> None:
        """Hands the puts among ended tasks' reports to the write-through."""
        for task, status, *_ in reports:
            if status == _core.ReportStatus.SUCCESS:
                self.put_ended(int(task), True)
            elif status in (_core.ReportStatus.FAILED, _core.ReportStatus.CANCELLED, _core.ReportStatus.NOTFOUND):
                self.put_ended(int(task), False)


__all__ = ["JOB_BASE", "RemoteFlow"]
