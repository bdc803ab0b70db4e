"""What a KVManager remembers of its tasks beyond the control plane: which are live (for ``reset``), the batch
handles of ``launch(..., as_batch=True)`` and the reports it took from the control plane for later waits.

Batch handles follow the original FlexKV: launching more than one get (or more than one put), or a layer-wise
launch, with ``as_batch=True`` merges the tasks into one batch task; ``launch`` returns ``[batch_id]``, a wait on
the batch id gives one KVResponse whose ``return_mask`` is the list of the tasks' masks (in launch order), and a
wait on a merged task's own id answers NOTFOUND. Batch ids come from a range the control plane never hands out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .request import KVResponse, KVResponseStatus

S = KVResponseStatus
BATCH_ID_BASE = 1 << 62
_ENDED = (S.SUCCESS, S.FAILED, S.CANCELLED)
_PRUNE_AT = 4096
_MAX_LIVE = 1 << 16


@dataclass
class _Batch:
    tasks: list[int]
    ended: dict[int, KVResponse] = field(default_factory=dict)

    def response(self, batch_id: int, waiting: KVResponseStatus) -> KVResponse:
        """The batch's response: ``waiting`` while a task runs, else SUCCESS when every task succeeded."""
        if len(self.ended) < len(self.tasks):
            return KVResponse(waiting, batch_id, None, None)
        reports = [self.ended[t] for t in self.tasks]
        status = S.SUCCESS
        for bad in (S.FAILED, S.CANCELLED):
            if any(r.status is bad for r in reports):
                status = bad
                break
        error = next((r.error for r in reports if r.error), None)
        masks = [r.return_mask if r.return_mask is not None else np.zeros(0, dtype=bool) for r in reports]
        return KVResponse(status, batch_id, masks, error)


class TaskBook:
    """Thread-safe bookkeeping of one facade's tasks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, None] = {}
        self._batches: dict[int, _Batch] = {}
        self._merged: dict[int, int] = {}  # task id -> the batch it was merged into
        self._kept: dict[int, KVResponse] = {}  # reports to hand out at the next wait (after a reset)
        self._next_batch = BATCH_ID_BASE
        self._prune_at = _PRUNE_AT

    # ------------------------------------------------------------ live tasks

    def add(self, task_id: int, still_known: Callable[[int], bool]) -> None:
        """A task the control plane made for this facade. Past a few thousand live ids, the ones the control
        plane no longer knows (reported through another facade, finished externally) are forgotten."""
        with self._lock:
            self._live[int(task_id)] = None
            if len(self._live) < self._prune_at:
                return
            ids = list(self._live)
        gone = [t for t in ids if not still_known(t)]
        with self._lock:
            for t in gone:
                if t not in self._merged:
                    self._live.pop(t, None)
            while len(self._live) > _MAX_LIVE:  # a plane that cannot tell (a server's): the oldest are long done
                oldest = next((t for t in self._live if t not in self._merged), None)
                if oldest is None:
                    break
                self._live.pop(oldest)
            self._prune_at = max(_PRUNE_AT, 2 * len(self._live))  # amortized: never a scan per task

    def live(self) -> list[int]:
        with self._lock:
            return list(self._live)

    def ids(self) -> dict[int, None]:
        """The task ids a caller may still wait for: live tasks not merged into a batch, and the batches."""
        with self._lock:
            out = {t: None for t in self._live if t not in self._merged}
            out.update({b: None for b in self._batches})
            out.update({t: None for t in self._kept})
            return out

    # --------------------------------------------------------------- batches

    def merge(self, task_ids: list[int]) -> int:
        """Merges launched tasks into a new batch; returns its id. Past a few thousand batches, the oldest whose
        tasks all ended and that nobody waited for are forgotten (as the original's tasks expire)."""
        with self._lock:
            if len(self._batches) >= _PRUNE_AT:
                for old in [b for b, batch in self._batches.items() if len(batch.ended) == len(batch.tasks)]:
                    for t in self._batches.pop(old).tasks:
                        self._merged.pop(t, None)
                        self._live.pop(t, None)
            batch_id = self._next_batch
            self._next_batch += 1
            self._batches[batch_id] = _Batch(list(task_ids))
            for t in task_ids:
                self._merged[t] = batch_id
            return batch_id

    def is_batch(self, task_id: int) -> bool:
        return task_id >= BATCH_ID_BASE

    def batch_tasks(self, batch_id: int) -> list[int] | None:
        with self._lock:
            batch = self._batches.get(batch_id)
            return None if batch is None else list(batch.tasks)

    # ----------------------------------------------------------------- waits

    def plan(self, task_ids: Iterable[int]) -> tuple[list[int], list[int], dict[int, KVResponse]]:
        """For a wait on ``task_ids``: (the control-plane ids to wait for, the merged ids to collect without
        waiting, the answers known already). A merged task answers NOTFOUND, as in the original FlexKV; its
        report is collected for its batch (callers that wait on the ids they matched end their batches so)."""
        ask: list[int] = []
        peek: list[int] = []
        known: dict[int, KVResponse] = {}
        with self._lock:
            for t in task_ids:
                if t in self._kept:
                    known[t] = self._kept.pop(t)
                    self._live.pop(t, None)
                elif t in self._merged:
                    known[t] = KVResponse(S.NOTFOUND, t, None, None)
                    if t not in self._batches[self._merged[t]].ended:
                        peek.append(t)
                elif t >= BATCH_ID_BASE:
                    batch = self._batches.get(t)
                    if batch is None:
                        known[t] = KVResponse(S.NOTFOUND, t, None, None)
                    else:
                        ask.extend(s for s in batch.tasks if s not in batch.ended)
                else:
                    ask.append(t)
        return list(dict.fromkeys(ask)), list(dict.fromkeys(peek)), known

    def settle(self, task_ids: Iterable[int], reports: dict[int, KVResponse], known: dict[int, KVResponse],
               waiting: KVResponseStatus, leave_out_running: bool) -> dict[int, KVResponse]:
        """The answers of a wait on ``task_ids`` from the control plane's ``reports`` of the ids :meth:`plan`
        asked about. A batch is answered when all its tasks ended (else ``waiting``, or left out)."""
        out: dict[int, KVResponse] = {}
        with self._lock:
            for t, r in reports.items():
                batch_id = self._merged.get(t)
                if batch_id is not None and r.status in _ENDED:
                    self._batches[batch_id].ended[t] = r
            for t in task_ids:
                if t in known:
                    out[t] = known[t]
                    continue
                batch = self._batches.get(t)
                if batch is not None:
                    resp = batch.response(t, waiting)
                    if resp.status is waiting and len(batch.ended) < len(batch.tasks):
                        if not leave_out_running:
                            out[t] = resp
                        continue
                    out[t] = resp
                    del self._batches[t]
                    for s in batch.tasks:
                        self._merged.pop(s, None)
                        self._live.pop(s, None)
                    continue
                if t in reports:
                    out[t] = reports[t]
                    if reports[t].status in (*_ENDED, S.NOTFOUND):
                        self._live.pop(t, None)
        return out

    def keep(self, reports: dict[int, KVResponse], cancelled_by: str | None = None) -> None:
        """Reports drained by a reset, for the next wait on their tasks (their batch, if merged): CANCELLED with
        the reason ``cancelled_by`` when given, else as they are."""
        with self._lock:
            for t, r in reports.items():
                if r.status is S.NOTFOUND and t not in self._merged:  # reported elsewhere, or finished externally
                    self._live.pop(t, None)
                if r.status not in _ENDED:
                    continue
                cancelled = r if cancelled_by is None else KVResponse(S.CANCELLED, t, r.return_mask, cancelled_by)
                batch_id = self._merged.get(t)
                if batch_id is not None:
                    self._batches[batch_id].ended[t] = cancelled
                else:
                    self._kept[t] = cancelled
            while len(self._kept) > _PRUNE_AT:  # never waited for (finished elsewhere): the oldest go
                self._kept.pop(next(iter(self._kept)))
