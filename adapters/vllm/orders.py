"""The scheduler side's ledger of copy orders in flight.

Every order (a load or a store of one request's blocks) is one control-plane task, named in the metadata by
an order id. Each worker reports each order once, in its ``FlexKVWorkerMetadata`` (summed over the workers
by vLLM); the order's task ends when every worker has reported it: a store's blocks become readable only if
every worker copied its slice. vLLM's own ``finished_recving`` / ``finished_sending`` end what is left of a
request's orders (they come once every worker is done with the request).

At shutdown the workers, which vLLM stops first, record the orders they completed but could not report any
more in a receipts file; ``close`` reads it so that those stores are kept (and written through to SSD) and
every other order ends as failed, its blocks unlocked.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from flexkv.core import end_task

from .metadata import FlexKVWorkerMetadata

logger = logging.getLogger("flexkv")


class OrderLedger:
    def __init__(self, kv: Any, workers: int, receipts: str) -> None:
        self.kv = kv
        self.workers = max(1, int(workers))
        self.receipts = receipts
        self._next = 1
        self._task: dict[int, int] = {}  # order -> task
        self._request: dict[int, str] = {}  # order -> request id
        self._store: dict[int, bool] = {}
        self._by_request: dict[str, set[int]] = {}
        self._reports: dict[int, list[int]] = {}  # order -> [workers ok, workers failed]
        self.failed_orders = 0
        self.last_report = time.monotonic()  # when a worker last reported an order

    def __len__(self) -> int:
        return len(self._task)

    def add(self, request_id: str, task: int, store: bool) -> int:
        if not self._task:  # the workers' silence counts from the first order in flight
            self.last_report = time.monotonic()
        order = self._next
        self._next += 1
        self._task[order] = task
        self._request[order] = request_id
        self._store[order] = store
        self._by_request.setdefault(request_id, set()).add(order)
        return order

    def stores_of(self, request_id: str) -> list[int]:
        """The request's store orders still in flight."""
        return sorted(o for o in self._by_request.get(request_id, ()) if self._store[o])

    def loads_of(self, request_id: str) -> list[int]:
        """The request's load orders still in flight."""
        return sorted(o for o in self._by_request.get(request_id, ()) if not self._store[o])

    def has_stores(self) -> bool:
        return any(self._store.values())

    def report(self, meta: Any) -> None:
        """Counts a step's worker reports; ends each order every worker has reported."""
        if not isinstance(meta, FlexKVWorkerMetadata):
            return
        self.last_report = time.monotonic()
        for orders, column in ((meta.ok, 0), (meta.failed, 1)):
            for order, n in orders.items():
                counts = self._reports.setdefault(order, [0, 0])
                counts[column] += n
        for order in [o for o, (ok, bad) in self._reports.items() if ok + bad >= self.workers]:
            ok, bad = self._reports.pop(order)
            self.end(order, bad == 0)

    def end_request(self, request_id: str, store: bool, ok: bool) -> None:
        """Ends the request's orders of one kind that are still open (vLLM says every worker is done)."""
        for order in [o for o in self._by_request.get(request_id, ()) if self._store[o] == store]:
            counts = self._reports.pop(order, [0, 0])
            self.end(order, ok and counts[1] == 0)

    def end(self, order: int, ok: bool) -> None:
        task = self._task.pop(order, None)
        if task is None:
            return
        rid = self._request.pop(order)
        store = self._store.pop(order)
        orders = self._by_request.get(rid)
        if orders is not None:
            orders.discard(order)
            if not orders:
                del self._by_request[rid]
        if not ok:
            self.failed_orders += 1
            logger.warning("FlexKV: %s of request %s failed on a worker; %s", "store" if store else "load", rid,
                           "its blocks are not stored" if store else "vLLM recomputes them")
        try:
            self.kv.finish_external(task, ok)
        except Exception as e:  # noqa: BLE001 - a task the plane already ended: its blocks are unlocked
            logger.warning("FlexKV: ending task %d of request %s failed: %s", task, rid, e)
            end_task(self.kv, task)

    def close(self) -> tuple[int, int]:
        """At shutdown, after the workers stopped: keeps the stores every worker recorded as done in the
        receipts file, ends every other order failed. Returns (orders kept, orders dropped)."""
        done: dict[int, int] = {}
        path = Path(self.receipts) if self.receipts else None
        if path is not None and path.exists() and not path.is_symlink() and path.stat().st_uid == os.getuid():
            for line in path.read_text().split():
                if line.isdigit():
                    done[int(line)] = done.get(int(line), 0) + 1
        if path is not None:
            for remove, target in ((os.unlink, path), (os.rmdir, path.parent)):  # the file, then its directory
                try:
                    remove(target)
                except OSError:
                    pass
        kept = dropped = 0
        for order in list(self._task):
            ok = done.get(order, 0) + self._reports.get(order, [0, 0])[0] >= self.workers and \
                self._reports.get(order, [0, 0])[1] == 0
            self._reports.pop(order, None)
            self.end(order, ok)
            kept, dropped = kept + ok, dropped + (not ok)
        return kept, dropped
