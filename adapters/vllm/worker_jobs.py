"""A worker's book of the copy jobs it runs for the scheduler's orders, and what it reports back.

An order may run as several copy jobs (a layer-wise load: one per layer on the host copy engine); it is done
when all its jobs are. A job is named by the CPU tier it runs on and its id there: (tier socket, job id). Done
orders are reported once, in the step's ``FlexKVWorkerMetadata``; a finished request that vLLM keeps for its
stores (``awaiting``) is reported in ``finished_sending`` once none of its stores runs on this worker. At
shutdown the stores done but not reported any more go to the receipts file the scheduler reads after the
workers stopped.
"""

from __future__ import annotations

import logging
import os

from .metadata import CopyOrder, FlexKVWorkerMetadata

logger = logging.getLogger("flexkv")


class _Running:
    __slots__ = ("order", "jobs", "error")

    def __init__(self, order: CopyOrder, jobs: int) -> None:
        self.order = order
        self.jobs = jobs
        self.error = ""


class JobBook:
    def __init__(self) -> None:
        self._job_order: dict[tuple[str, int], int] = {}  # (tier socket, copy job) -> order id
        self._running: dict[int, _Running] = {}  # order id -> its jobs still running
        self._stores_of: dict[str, set[int]] = {}  # request -> its store orders running here
        self._ok: dict[int, int] = {}  # orders done since the last report
        self._failed: dict[int, int] = {}
        self._unreported_stores: set[int] = set()  # store orders done ok, not yet in a report
        self.awaiting: set[str] = set()  # finished requests vLLM keeps until reported in finished_sending
        self.finished: set[str] = set()
        self.recved: set[str] = set()  # asynchronous loads done, to report in finished_recving
        self.load_errors: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self._job_order)

    def __len__(self) -> int:
        return len(self._job_order)

    def sockets(self) -> set[str]:
        """The CPU tiers some job runs on."""
        return {socket for socket, _ in self._job_order}

    def expect(self, order: CopyOrder) -> None:
        """A store ordered in this step's metadata, queued later (``wait_for_save``; with speculative decoding vLLM
        calls that after ``get_finished``): its request is not reported in ``finished_sending`` before it is done,
        so vLLM never frees the blocks it copies."""
        self._stores_of.setdefault(order.request_id, set()).add(order.order_id)

    def started(self, order: CopyOrder, jobs: list[tuple[str, int]]) -> None:
        """Records the jobs an order runs as (none: the order is done at once, with ``error`` if not empty)."""
        run = _Running(order, len(jobs))
        self._running[order.order_id] = run
        for job in jobs:
            self._job_order[job] = order.order_id
        if order.store:
            self._stores_of.setdefault(order.request_id, set()).add(order.order_id)

    def job_done(self, job: tuple[str, int], error: str) -> None:
        order_id = self._job_order.pop(job, None)
        run = self._running.get(order_id) if order_id is not None else None
        if run is None:
            return
        run.jobs -= 1
        run.error = run.error or error
        if run.jobs <= 0:
            self.order_done(run.order, run.error)

    def order_done(self, order: CopyOrder, error: str) -> None:
        self._running.pop(order.order_id, None)
        if error:
            logger.warning("FlexKV: %s of request %s failed: %s", "store" if order.store else "load",
                           order.request_id, error)
            if not order.store:
                self.load_errors.update(order.engine_blocks)
        if order.order_id:
            (self._failed if error else self._ok)[order.order_id] = 1
            if order.store and not error:
                self._unreported_stores.add(order.order_id)
        if order.store:
            orders = self._stores_of.get(order.request_id)
            if orders is not None:
                orders.discard(order.order_id)
                if not orders:
                    del self._stores_of[order.request_id]
        elif not order.sync:
            self.recved.add(order.request_id)

    def abandon(self, order_ids: list[int], why: str) -> None:
        """Fails these orders, whose jobs still run: what they copy is never made readable. They are reported
        (failed) once their jobs end, so the control plane keeps their CPU blocks until no copy writes there."""
        for order_id in set(order_ids):
            run = self._running.get(order_id)
            if run is not None:
                run.error = run.error or why

    def jobs_of(self, order_ids: list[int]) -> set[tuple[str, int]]:
        """The copy jobs still running for these orders."""
        wanted = set(order_ids)
        return {job for job, order in self._job_order.items() if order in wanted}

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """Requests vLLM waits for whose stores on this worker are all done."""
        self.finished.update(finished_req_ids)
        done = {r for r in self.awaiting if r in self.finished and r not in self._stores_of}
        self.awaiting -= done
        self.finished &= self.awaiting  # vLLM names a finished request once, in the step it awaits it
        return done

    def take_report(self) -> FlexKVWorkerMetadata | None:
        if not self._ok and not self._failed:
            return None
        meta = FlexKVWorkerMetadata(ok=self._ok, failed=self._failed)
        self._ok, self._failed = {}, {}
        self._unreported_stores.clear()
        return meta

    def write_receipts(self, path: str) -> None:
        """Records the stores done here that no report carried (the scheduler reads them at its shutdown)."""
        if not path or not self._unreported_stores:
            return
        data = "".join(f"{order}\n" for order in sorted(self._unreported_stores)).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as e:
            logger.warning("FlexKV: could not record %d finished stores for the scheduler (%s): they are dropped",
                           len(self._unreported_stores), e)
            return
        self._unreported_stores.clear()
