"""RankAgent: one tensor-parallel rank's end of the rank orders (see ``rank_hub.py``).

In the rank's process it registers the rank's KV memory (its head slice of every block) at the hub's
``gpu_register_port``, maps the CPU tier the hub names, and from then on copies every order it receives with
its own data plane (the GPU copy engine on the rank's device, or host threads), answering each with
``RankDone``. One thread receives orders; one collects finished copies; a heartbeat keeps the rank's lease.
If the hub stops answering for a lease, the agent registers again when it is back (a restarted server has a
new CPU tier: the agent maps the new one).

Layer-wise loads: listeners added with ``add_layer_listener`` hear ``(counter, layer)`` once each layer of a
layer-wise load order is in this rank's KV memory (layer by layer on the GPU, all at once on the host copy
threads; also when the copy failed, so that nothing waits forever), ``counter`` being the launch's
``counter_id``: each rank releases its own forward pass from its own copy (SGLang's per-rank eventfds).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import wire
from .config import CacheConfig
from .data_plane import DataPlane
from .endpoint import parse_endpoint
from .errors import FlexKVError
from .layout import EngineLayout

logger = logging.getLogger("flexkv")


class RankAgent:
    """``make_layout(model)`` builds this rank's EngineLayout from the hub's model description (its config
    keys, ``tp_size``, ``tokens_per_block``, ``block_bytes``): the rank's KV tensors as its head slice.

    ``rank``: this rank's tensor-parallel rank (or ``rank(model)``); by default the layout's ``tp_rank``. An MLA
    model's layout covers the whole latent (``tp_size`` 1, as every rank holds all of it), so its ranks must
    give their rank here: the agent registers as rank ``rank`` of the model's ``tp_size``."""

    def __init__(self, endpoint: str, make_layout: Callable[[dict[str, Any]], EngineLayout], *, instance: int = 0,
                 token: str = "", timeout_s: float = 5.0, num_copy_threads: int = 2,
                 rank: int | Callable[[dict[str, Any]], int] | None = None) -> None:
        self.endpoint = parse_endpoint(endpoint, token)
        if self.endpoint.scheme == "ipc" and not os.path.exists(self.endpoint.path):
            raise wire.ServerUnavailable(f"nothing listens at {endpoint}: no FlexKV KVManager of this model (with "
                                         "tp_size > 1 or in server mode) nor `flexkv serve` has started there yet")
        self.timeout_s = float(timeout_s)
        self._ctx = zmq.Context()
        try:
            self.model = self._ask(wire.DescribeModel(token))
            self.layout = make_layout(self.model)
            self.layout.validate()
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self.cache_config = CacheConfig(tokens_per_block=self.model["tokens_per_block"], **self.model["copy"])
        layout = self.layout
        replicated = bool(self.model["use_mla"])  # every rank holds the whole latent: one stores, all load
        self.rank = layout.tp_rank if rank is None else int(rank(self.model) if callable(rank) else rank)
        self.tp_size = int(self.model["tp_size"]) if replicated else layout.tp_size
        self._register = wire.RegisterRank(wire.PROTOCOL, f"rank{self.rank}@{socket.gethostname()}:{os.getpid()}",
                                           os.getpid(), int(instance), self.rank, self.tp_size,
                                           layout.num_blocks, self.model["fingerprint"],
                                           self.model["tokens_per_block"], layout.block_bytes, token, replicated)
        self._threads_n = num_copy_threads
        self._sock: zmq.Socket | None = None  # the receiver thread's (orders arrive on it)
        self._send_lock = threading.Lock()
        self._out: zmq.Socket | None = None  # answers and heartbeats
        self.session = ""
        self.lease_s = 10.0
        self.tier: dict[str, Any] = {}
        self.plane: DataPlane | None = None
        self._jobs: dict[int, tuple[int, int]] = {}  # data-plane job -> (order job, task)
        self._jobs_lock = threading.Lock()
        self._tasks_cv = threading.Condition()
        self._task_jobs: dict[int, tuple[Any, int]] = {}  # task -> (plane, job) of this rank's copy
        self._task_ends: dict[int, str] = {}  # task -> its copy's error ("" done) here, the latest _KEEP_TASKS
        self._stop = threading.Event()
        self._last_answer = time.monotonic()
        self.orders = 0
        self.failed = 0
        self._layer_listeners: list[Callable[[int, int], None]] = []
        self._layer_jobs: queue.Queue[tuple[Any, int, int] | None] = queue.Queue()  # (plane, job|-1, counter)
        try:
            self._connect()
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._threads = [threading.Thread(target=self._receive, name="flexkv-rank-orders", daemon=True),
                         threading.Thread(target=self._collect, name="flexkv-rank-copies", daemon=True)]
        for t in self._threads:
            t.start()

    def add_layer_listener(self, listener: Callable[[int, int], None]) -> None:
        """Calls ``listener(counter, layer)`` as each layer of a layer-wise load arrives in this rank."""
        if not self._layer_listeners:
            t = threading.Thread(target=self._signal_layers, name="flexkv-rank-layers", daemon=True)
            self._threads.append(t)
            t.start()
        self._layer_listeners.append(listener)

    def _ask(self, msg: Any) -> Any:
        """One question to the hub on a socket of its own."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint.address)
            sock.send_multipart([b"ask", wire.encode(msg)])
            if not sock.poll(int(self.timeout_s * 1000)):
                raise wire.ServerUnavailable(f"no FlexKV rank dispatcher answered at {self.endpoint.address} within "
                                             f"{self.timeout_s:g} s")
            reply = wire.decode_rank_inbound(sock.recv_multipart()[-1])
        finally:
            sock.close(0)
        if isinstance(reply, wire.Err):
            wire.raise_error(reply)
        return reply.value

    # -------------------------------------------------------------------------------------------- session

    def _connect(self) -> None:
        """Registers (again) and maps the hub's CPU tier; raises what the hub refused."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint.address)
        sock.send_multipart([b"register", wire.encode(self._register)])  # this socket then receives the orders
        if not sock.poll(int(self.timeout_s * 1000)):
            sock.close(0)
            raise wire.ServerUnavailable(f"no FlexKV rank dispatcher answered at {self.endpoint.address} within "
                                         f"{self.timeout_s:g} s")
        reply = wire.decode_rank_inbound(sock.recv_multipart()[-1])
        if isinstance(reply, wire.Err):
            sock.close(0)
            wire.raise_error(reply)
        info = reply.value
        tier = dict(info["tier"])
        if tier != self.tier:
            old, self.plane = self.plane, None
            if old is not None:
                old.close()
            self.plane = DataPlane(tier, self.layout, self.cache_config, self._threads_n)
            self.tier = tier
        if self._sock is not None:
            self._sock.close(0)
        self._sock = sock
        self.session = info["session"]
        self.lease_s = float(info["lease_s"])
        self._last_answer = time.monotonic()
        logger.info("FlexKV: rank %d/%d registered at %s", self.rank, self.tp_size,
                    self.endpoint.address)

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            if self._out is None:
                self._out = self._ctx.socket(zmq.DEALER)
                self._out.setsockopt(zmq.LINGER, 0)
                self._out.connect(self.endpoint.address)
            self._out.send_multipart([b"\0" * 8, wire.encode(msg)])

    def close(self) -> None:
        """Says goodbye (open orders of this rank fail at once), waits for copies in flight, unmaps the tier."""
        if self._stop.is_set():
            return
        try:
            self._send(wire.RankBye(self.session))
        except zmq.ZMQError:
            pass
        self._stop.set()
        self._layer_jobs.put(None)
        for t in self._threads:
            t.join(timeout=10)
        if self.plane is not None:
            self.plane.close()
            self.plane = None
        self._ctx.destroy(linger=0)

    # -------------------------------------------------------------------------------------------- threads

    def _receive(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._send(wire.RankHeartbeat(self.session))
                next_beat = now + max(0.05, self.lease_s / 3)
            if now - self._last_answer > self.lease_s:
                self._reconnect()
                continue
            sock = self._sock
            if sock is None or not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            self._last_answer = time.monotonic()
            try:
                msg = wire.decode_rank_inbound(frames[-1])
            except Exception as e:
                logger.error("FlexKV rank %d: an unreadable message from the hub: %s", self.rank, e)
                continue
            if isinstance(msg, wire.Order):
                self._copy(msg)
            elif isinstance(msg, wire.Err) and msg.kind == "session":
                self._reconnect()

    def _reconnect(self) -> None:
        try:
            self._connect()
        except (FlexKVError, zmq.ZMQError) as e:
            logger.warning("FlexKV rank %d: the dispatcher at %s is gone (%s); retrying", self.rank,
                           self.endpoint.address, e)
            self._stop.wait(min(1.0, self.lease_s / 3))

    def _copy(self, order: wire.Order) -> None:
        self.orders += 1
        plane = self.plane
        try:
            if plane is None:
                raise FlexKVError("the CPU tier is not mapped")
            engine, host = wire.ids_array(order.engine_blocks), wire.ids_array(order.host_blocks)
            layerwise = order.load and order.layerwise
            with self._jobs_lock:
                job = plane.submit("host_to_engine" if order.load else "engine_to_host", engine, host,
                                   urgent=order.load, layerwise=layerwise)
                self._jobs[job] = (order.job, order.task)
            with self._tasks_cv:
                _keep(self._task_jobs, order.task, (plane, job))
                self._tasks_cv.notify_all()
            if layerwise and self._layer_listeners:
                self._layer_jobs.put((plane, job, order.counter))
        except Exception as e:  # never leave the order open: the task would wait for this rank
            self.failed += 1
            self._send(wire.RankDone(self.session, order.job, str(e) or type(e).__name__))
            self._ended(order.task, str(e) or type(e).__name__)
            if order.load and order.layerwise and self._layer_listeners:
                self._layer_jobs.put((None, -1, order.counter))  # nothing to wait for: release the layers

    def _signal_layers(self) -> None:
        num_layers = int(self.model["num_layers"])
        while True:
            item = self._layer_jobs.get()
            if item is None:
                return
            plane, job, counter = item
            for layer in range(num_layers):
                if plane is not None and job >= 0:
                    try:
                        plane.wait_layer(job, layer)
                    except Exception as e:  # a replaced plane: the copy is gone; release the layer anyway
                        logger.error("FlexKV rank %d: waiting for layer %d failed: %s", self.rank, layer, e)
                for listener in list(self._layer_listeners):
                    try:
                        listener(counter, layer)
                    except Exception:
                        logger.exception("FlexKV rank %d: a layer listener failed", self.rank)

    def _collect(self) -> None:
        while not self._stop.is_set():
            plane = self.plane
            if plane is None:
                self._stop.wait(0.01)
                continue
            for job, error in plane.poll(20_000):
                with self._jobs_lock:
                    order = self._jobs.pop(job, None)
                if order is not None:
                    if error:
                        self.failed += 1
                    self._send(wire.RankDone(self.session, order[0], error))
                    self._ended(order[1], error)

    def _ended(self, task: int, error: str) -> None:
        with self._tasks_cv:
            _keep(self._task_ends, task, error)
            self._task_jobs.pop(task, None)
            self._tasks_cv.notify_all()

    def wait_task(self, task: int, layer: int = -1, stream: int | None = None, timeout: float = 20.0) -> bool:
        """Waits until this rank's copy of ``task`` (a launched load) has brought ``layer`` in (-1: every layer)
        and says whether it succeeded; False also when no order of the task came within ``timeout`` s. With
        ``stream`` (a cudaStream_t of the rank's device, as an int) the stream waits for the layer instead,
        without blocking: True once the copy is queued. The task's whole outcome is the launcher's (every rank's
        copy): this is the rank's own part, for a rank that must not read its KV before it is there."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._tasks_cv:
            while task not in self._task_jobs and task not in self._task_ends:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._tasks_cv.wait(min(left, 0.1))
            if task in self._task_ends:
                return self._task_ends[task] == ""
            plane, job = self._task_jobs[task]
        if stream is not None and layer >= 0:
            plane.copy.stream_wait_group(job, layer, stream)
            return True
        with self._tasks_cv:
            while task not in self._task_ends:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._tasks_cv.wait(min(left, 0.1))
            return self._task_ends[task] == ""


_KEEP_TASKS = 4096


def _keep(table: dict[int, Any], key: int, value: Any) -> None:
    table[key] = value
    while len(table) > _KEEP_TASKS:
        del table[next(iter(table))]
