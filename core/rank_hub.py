"""RankHub: hands the copies of launched tasks to the tensor-parallel ranks that hold the engine's KV memory.

It runs in the process that owns the control plane (``flexkv serve``, or an in-process KVManager whose ranks
live in other processes) at ``gpu_register_port``. Each rank's ``RankAgent`` registers there (instance, rank,
TP size, engine blocks) and gets the CPU tier to map. Once every rank of an instance has registered, the hub
registers a rank layout with the control plane (``register_rank_layout``); a launch on it turns into orders
(``next_rank_order``) that the hub sends to every rank of that instance, each copying its own head slice. When
all ranks have answered, the hub ends the order (``finish_rank_order``) and the task ends like any copy.

A rank that sends nothing for a lease (killed) is dropped: its open orders fail, so no task waits for it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import zmq

from . import wire
from .endpoint import EndpointLock, parse_endpoint, private_umask
from .errors import FlexKVError

logger = logging.getLogger("flexkv")


def rank_endpoint(server_recv_port: str) -> str:
    """FlexKV's gpu_register_port for a server endpoint: ``<ipc path>_gpu_register``, or the next tcp port."""
    if server_recv_port.startswith("tcp://"):
        host, _, port = server_recv_port[len("tcp://"):].rpartition(":")
        return f"tcp://{host}:{int(port) + 1}"
    return f"{server_recv_port}_gpu_register"


def describe_model(model_config: Any, cache_config: Any) -> dict[str, Any]:
    """What ranks read from the hub (DescribeModel): the model's keys, the block geometry, the copy options."""
    tpb = cache_config.tokens_per_block
    return {"num_layers": model_config.num_layers, "num_kv_heads": model_config.num_kv_heads,
            "head_size": model_config.head_size, "dtype": model_config.dtype_name, "use_mla": model_config.use_mla,
            "tp_size": model_config.tp_size, "tokens_per_block": tpb, "block_bytes": model_config.block_bytes(tpb),
            "fingerprint": model_config.fingerprint(),
            "copy": {k: getattr(cache_config, k) for k in ("use_ce_transfer_h2d", "use_ce_transfer_d2h",
                                                            "transfer_sms_h2d", "transfer_sms_d2h")}}


@dataclass
class _Rank:
    session: str
    identity: bytes
    instance: int
    rank: int
    client: str
    last_seen: float


@dataclass
class _Instance:
    tp_size: int
    num_blocks: int
    replicated: bool = False  # MLA: rank 0 stores, every rank loads
    ranks: dict[int, _Rank] = field(default_factory=dict)
    layout: int = -1  # the control plane's rank layout, once every rank registered


@dataclass
class _Open:
    instance: int
    waiting: set[int]  # ranks that have not answered
    errors: list[str] = field(default_factory=list)


class RankHub:
    """``model``: the plane's model config keys plus ``tokens_per_block``, ``block_bytes`` and ``fingerprint``;
    ranks read it (DescribeModel) to build their head slice and must register with the same."""

    def __init__(self, plane: Any, endpoint: str, model: dict[str, Any], *, token: str = "", lease_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plane = plane
        self.model = model  # what DescribeModel answers: the model config, tokens_per_block, block_bytes, fingerprint
        self.endpoint = parse_endpoint(endpoint, token, serving=True)
        self.token, self.lease_s, self.clock = token, float(lease_s), clock
        self._lock = threading.Lock()
        self._instances: dict[int, _Instance] = {}
        self._by_session: dict[str, _Rank] = {}
        self._open: dict[int, _Open] = {}  # order job -> who still copies
        self._layouts: dict[int, int] = {}  # rank layout -> instance
        self._counters: dict[int, int] = {}  # task -> counter id of its layer-wise launch, until dispatched
        self._file_lock = EndpointLock(self.endpoint)
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._outbox = f"inproc://flexkv-rank-orders-{id(self)}"
        self._threads: list[threading.Thread] = []
        self.on_layout: Callable[[int, int], None] | None = None  # (instance, layout) once its ranks are all in
        self._closed = False

    def start(self) -> RankHub:
        self._file_lock.acquire()
        try:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            with private_umask():
                router.bind(self.endpoint.address)
            self._file_lock.secure_socket()
            inbox = self._ctx.socket(zmq.PULL)
            inbox.bind(self._outbox)
        except BaseException:
            self._file_lock.release()
            raise
        self._threads = [threading.Thread(target=self._loop, args=(router, inbox), name="flexkv-rank-hub", daemon=True),
                         threading.Thread(target=self._dispatch, name="flexkv-rank-orders", daemon=True)]
        for t in self._threads:
            t.start()
        return self

    def close(self, grace_s: float = 5.0) -> None:
        """Waits up to ``grace_s`` for the ranks' open orders, fails the rest, stops. Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = self.clock() + grace_s
        while self._open and self.clock() < deadline and not self._stop.is_set():
            time.sleep(0.01)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        self._fail_open(lambda o: True, "the FlexKV rank dispatcher stopped")
        self._file_lock.release()
        self._ctx.destroy(linger=0)

    def layout_of(self, instance: int) -> int:
        """The rank layout of ``instance``, or -1 until all its ranks registered."""
        with self._lock:
            inst = self._instances.get(instance)
            return inst.layout if inst is not None else -1

    def ranks_of(self, instance: int) -> tuple[int, int]:
        """(ranks registered, ranks expected) of an instance."""
        with self._lock:
            inst = self._instances.get(instance)
            return (0, 0) if inst is None else (len(inst.ranks), inst.tp_size)

    def note_counter(self, tasks: list[int], counter: int) -> None:
        """The layer-done counter of a layer-wise launch of ``tasks``, for their orders (call before the launch:
        the orders may leave at once). Bounded: a launch that failed leaves nothing that grows."""
        with self._lock:
            for t in tasks:
                self._counters[int(t)] = int(counter)
            while len(self._counters) > 4096:
                del self._counters[next(iter(self._counters))]

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return [{"instance": i, "tp_size": inst.tp_size, "ranks": sorted(inst.ranks), "ready": inst.layout >= 0,
                     "idle_s": {r: round(now - x.last_seen, 3) for r, x in inst.ranks.items()}}
                    for i, inst in sorted(self._instances.items())]

    # ------------------------------------------------------------------------------------------------ loop

    def _loop(self, router: zmq.Socket, inbox: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(inbox, zmq.POLLIN)
        next_expiry = self.clock() + min(1.0, self.lease_s / 4)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(50):
                    if sock is inbox:
                        router.send_multipart(inbox.recv_multipart())
                        continue
                    frames = router.recv_multipart()
                    if len(frames) != 3:
                        continue
                    reply = self._handle(*frames)
                    if reply is not None:
                        router.send_multipart([frames[0], frames[1], wire.encode(reply)])
                if self.clock() >= next_expiry:
                    self._expire()
                    next_expiry = self.clock() + min(1.0, self.lease_s / 4)
        except Exception:
            logger.exception("FlexKV rank hub: the loop failed; ranks get no more orders")
        finally:
            router.close(0)
            inbox.close(0)

    def _handle(self, identity: bytes, rid: bytes, body: bytes) -> Any:
        try:
            msg = wire.decode_rank_request(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return wire.Err("schema", f"not a FlexKV rank message of protocol {wire.PROTOCOL}: {e}")
        try:
            if isinstance(msg, wire.DescribeModel):
                self._check_token(msg.token)
                return wire.Ok(self.model)
            if isinstance(msg, wire.RegisterRank):
                return wire.Ok(self._register(identity, msg))
            with self._lock:
                rank = self._by_session.get(msg.session)
                if rank is not None:
                    rank.last_seen = self.clock()
            if rank is None:
                return None if isinstance(msg, wire.RankDone) else wire.Err("session", "unknown rank session; "
                                                                          "register again")
            if isinstance(msg, wire.RankDone):
                self._done(rank, msg.job, msg.error)
                return None
            if isinstance(msg, wire.RankBye):
                self._drop(rank, f"rank {rank.rank} of instance {rank.instance} left")
            return wire.Ok(None)
        except Exception as e:
            if not isinstance(e, FlexKVError):
                logger.exception("FlexKV rank hub: %s failed", type(msg).__name__)
            return wire.error_reply(e)

    def _check_token(self, token: str) -> None:
        if self.endpoint.scheme == "tcp" and token != self.token:
            raise wire.ServerError("auth", "wrong or missing server_token for this tcp:// server")

    def _register(self, identity: bytes, msg: wire.RegisterRank) -> dict[str, Any]:
        self._check_token(msg.token)
        if msg.protocol != wire.PROTOCOL:
            raise wire.ServerError("protocol", f"the rank speaks FlexKV protocol {msg.protocol}, this process "
                                   f"{wire.PROTOCOL}; run the same FlexKV version everywhere")
        m = self.model
        mine = (m["fingerprint"], m["tokens_per_block"], m["block_bytes"])
        if (msg.fingerprint, msg.tokens_per_block, msg.block_bytes) != mine:
            raise wire.ServerError("config", f"{msg.client} registers KV memory of model {msg.fingerprint!r}, "
                                   f"{msg.tokens_per_block} tokens per block ({msg.block_bytes} bytes); this cache "
                                   f"holds {mine[0]!r}, {mine[1]} tokens per block ({mine[2]} bytes)")
        if not 0 <= msg.rank < msg.tp_size:
            raise wire.ServerError("config", f"rank {msg.rank} is outside tp_size {msg.tp_size}")
        layout_ready: tuple[int, int] | None = None
        with self._lock:
            inst = self._instances.get(msg.instance)
            if inst is None or not inst.ranks:
                old_layout = inst.layout if inst is not None else -1
                inst = self._instances[msg.instance] = _Instance(msg.tp_size, msg.num_blocks, msg.replicated,
                                                                 layout=old_layout)
            if (inst.tp_size, inst.num_blocks) != (msg.tp_size, msg.num_blocks):
                raise wire.ServerError("config", f"rank {msg.rank} of instance {msg.instance} has tp_size "
                                       f"{msg.tp_size} and {msg.num_blocks} engine blocks; the ranks registered "
                                       f"before it have {inst.tp_size} and {inst.num_blocks}")
            old = inst.ranks.get(msg.rank)
            if old is not None:  # the same rank again (a restarted worker): the old one's orders fail
                self._by_session.pop(old.session, None)
            rank = _Rank(secrets.token_hex(16), identity, msg.instance, msg.rank, msg.client, self.clock())
            inst.ranks[msg.rank] = rank
            self._by_session[rank.session] = rank
            complete = len(inst.ranks) == inst.tp_size
        if old is not None:
            self._fail_open(lambda o: o.instance == msg.instance and old.rank in o.waiting,
                            f"rank {old.rank} of instance {msg.instance} registered again mid-copy")
        if complete and self.layout_of(msg.instance) < 0:
            layout = int(self.plane.register_rank_layout(msg.num_blocks))
            with self._lock:
                inst.layout = layout
                self._layouts[layout] = msg.instance
            layout_ready = (msg.instance, layout)
        logger.info("FlexKV: rank %d/%d of instance %d (%s) registered its KV memory (%d blocks)", msg.rank,
                    msg.tp_size, msg.instance, msg.client, msg.num_blocks)
        if layout_ready is not None and self.on_layout is not None:
            self.on_layout(*layout_ready)
        return {"session": rank.session, "tier": dict(self.plane.tier_info()), "lease_s": self.lease_s}

    # ---------------------------------------------------------------------------------------------- orders

    def _dispatch(self) -> None:
        out = self._ctx.socket(zmq.PUSH)
        out.setsockopt(zmq.LINGER, 0)
        out.connect(self._outbox)
        try:
            while not self._stop.is_set():
                order = self.plane.next_rank_order(0.05)
                if order is None:
                    continue
                job, task, layout, direction, layerwise, engine_blocks, host_blocks = order
                self._send(out, int(job), int(task), int(layout), direction == "host_to_engine", bool(layerwise),
                           np.asarray(engine_blocks), np.asarray(host_blocks))
        except Exception:
            logger.exception("FlexKV rank hub: dispatching orders failed; ranks get no more orders")
        finally:
            out.close(0)

    def _send(self, out: zmq.Socket, job: int, task: int, layout: int, load: bool, layerwise: bool,
              engine_blocks: np.ndarray, host_blocks: np.ndarray) -> None:
        with self._lock:
            instance = self._layouts.get(layout)
            inst = self._instances.get(instance) if instance is not None else None
            ranks = list(inst.ranks.values()) if inst is not None else []
            missing = inst is None or len(ranks) < inst.tp_size
            if not missing and inst.replicated and not load:
                ranks = [r for r in ranks if r.rank == 0]  # every rank holds the same latent: one writes it
            if not missing:
                self._open[job] = _Open(instance, {r.rank for r in ranks})
            counter = self._counters.pop(task, 0) if layerwise else 0
        if missing:
            self.plane.finish_rank_order(job, "not every tensor-parallel rank of the engine is registered "
                                         "(a rank process ended?)")
            return
        body = wire.encode(wire.Order(job, task, load, layerwise, wire.ids_bytes(engine_blocks),
                                      wire.ids_bytes(host_blocks), counter))
        for r in ranks:
            out.send_multipart([r.identity, b"\0" * 8, body])

    def _done(self, rank: _Rank, job: int, error: str) -> None:
        with self._lock:
            o = self._open.get(job)
            if o is None or o.instance != rank.instance or rank.rank not in o.waiting:
                return
            o.waiting.discard(rank.rank)
            if error:
                o.errors.append(f"rank {rank.rank}: {error}")
            finished = not o.waiting
            if finished:
                del self._open[job]
        if finished:
            self.plane.finish_rank_order(job, "; ".join(o.errors))

    def _fail_open(self, which: Callable[[_Open], bool], why: str) -> None:
        with self._lock:
            jobs = [j for j, o in self._open.items() if which(o)]
            for j in jobs:
                del self._open[j]
        for j in jobs:
            if not self.plane.closed:
                self.plane.finish_rank_order(j, why)

    def _drop(self, rank: _Rank, why: str) -> None:
        with self._lock:
            self._by_session.pop(rank.session, None)
            inst = self._instances.get(rank.instance)
            if inst is not None and inst.ranks.get(rank.rank) is rank:
                del inst.ranks[rank.rank]
        self._fail_open(lambda o: o.instance == rank.instance and rank.rank in o.waiting, why)

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            dead = [r for r in self._by_session.values() if now - r.last_seen > self.lease_s]
        for r in dead:
            logger.warning("FlexKV: rank %d of instance %d (%s) sent nothing for %.1f s; its copies fail", r.rank,
                           r.instance, r.client, now - r.last_seen)
            self._drop(r, f"rank {r.rank} of instance {r.instance} stopped answering (lease {self.lease_s:g} s)")
