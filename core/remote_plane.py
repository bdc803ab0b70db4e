"""RemotePlane: a client of ``flexkv serve`` with the control plane's methods, so facades drive a server as
they drive an in-process plane.

Every call is bounded: a request unanswered within ``timeout_s`` raises ServerUnavailable (the adapters turn
it into a miss or a skipped store), and for the next ``timeout_s`` calls fail at once instead of waiting
again; then the client reconnects (a new session if the server restarted). Waits run in slices of at most
``timeout_s``, so a server that dies mid-wait costs one slice. A heartbeat thread keeps the session's lease
while the engine is idle. Sockets are per thread (ZeroMQ sockets are not thread-safe).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from typing import Any

import numpy as np
import zmq

from flexkv import _core

from . import wire
from .endpoint import parse_endpoint
from .errors import TaskError

logger = logging.getLogger("flexkv")

_TRY_TAKE_POLL_S = (0.0005, 0.005)  # first and longest pause between try_takes while blocks come up from SSD


class RemotePlane:
    """Talks to the server at ``endpoint`` for the engine instance ``instance``. ``fingerprint``,
    ``tokens_per_block`` and ``block_bytes`` must match the server's (checked at connect)."""

    def __init__(self, endpoint: str, *, fingerprint: str, tokens_per_block: int, block_bytes: int,
                 instance: int = 0, token: str = "", timeout_s: float = 0.5, what: str = "engine") -> None:
        self.endpoint = parse_endpoint(endpoint, token)
        self.tokens_per_block = int(tokens_per_block)
        self.block_bytes = int(block_bytes)
        self.model_fingerprint = fingerprint
        self.timeout_s = float(timeout_s)
        self._hello = wire.Hello(wire.PROTOCOL, f"{what}@{socket.gethostname()}:{os.getpid()}", os.getpid(),
                                 int(instance), fingerprint, self.tokens_per_block, self.block_bytes, token)
        self._token = token
        self._ctx = zmq.Context()
        self._local = threading.local()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._session: str | None = None
        self._tier: dict[str, Any] = {}
        self._lease_s = 10.0
        self._down_until = 0.0
        self._closed = False
        self._stop = threading.Event()
        self.unavailable = 0  # calls that found the server unreachable
        try:
            self.connect()
        except BaseException:
            self._closed = True
            self._drop_socket()
            self._ctx.destroy(linger=0)
            raise
        self._heartbeat = threading.Thread(target=self._beat, name="flexkv-heartbeat", daemon=True)
        self._heartbeat.start()

    # ------------------------------------------------------------------------------------------ connection

    @property
    def closed(self) -> bool:
        return self._closed

    def connect(self) -> None:
        """Opens a session (again after a server restart); raises what the server refused."""
        info = self._request(self._hello)
        with self._lock:
            self._session = info["session"]
            self._tier = dict(info["tier"])
            self._lease_s = float(info["lease_s"])
        logger.info("FlexKV: connected to the server at %s (pid %s)", self.endpoint.address, info.get("server_pid"))

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint.address)
            self._local.sock = sock
        return sock

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close(0)
            self._local.sock = None

    def _request(self, msg: Any, timeout_s: float | None = None) -> Any:
        """One round trip; the reply's value, or the server's error raised as FlexKV's exception."""
        if self._closed:
            raise TaskError("the FlexKV client is shut down")
        if time.monotonic() < self._down_until:
            self.unavailable += 1
            raise wire.ServerUnavailable(f"the FlexKV server at {self.endpoint.address} did not answer recently; "
                                         "retrying after a pause")
        bound = self.timeout_s if timeout_s is None else timeout_s
        rid = next(self._ids).to_bytes(8, "little")
        sock = self._socket()
        sock.send_multipart([rid, wire.encode(msg)])
        deadline = time.monotonic() + bound
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                self._drop_socket()  # a late answer must not be read as the next request's
                self._down_until = time.monotonic() + bound
                self.unavailable += 1
                raise wire.ServerUnavailable(f"the FlexKV server at {self.endpoint.address} did not answer within "
                                             f"{bound:.3g} s (server_timeout_seconds)")
            frames = sock.recv_multipart()
            if len(frames) == 2 and frames[0] == rid:
                break
        reply = wire.decode_reply(frames[1])
        if isinstance(reply, wire.Err):
            wire.raise_error(reply)
        return reply.value

    def _call(self, make: Any, timeout_s: float | None = None) -> Any:
        """A request of this session; reconnects once if the server no longer knows the session."""
        for attempt in (0, 1):
            session = self._session
            if session is None:
                self.connect()
                session = self._session
            try:
                return self._request(make(session), timeout_s)
            except wire.ServerError as e:
                if e.kind != "session" or attempt:
                    raise
                with self._lock:
                    if self._session == session:
                        self._session = None
        raise AssertionError("unreachable")

    def _beat(self) -> None:
        while not self._stop.wait(max(0.05, self._lease_s / 3)):
            try:
                self._call(lambda s: wire.Heartbeat(s))
            except Exception as e:  # the next call reports it; the heartbeat only keeps the lease
                logger.debug("FlexKV: heartbeat to %s failed: %s", self.endpoint.address, e)

    def shutdown(self) -> None:
        """Ends the session (the server ends the tasks it still holds) and closes the sockets."""
        if self._closed:
            return
        self._stop.set()
        session = self._session
        if session is not None:
            try:
                self._request(wire.Bye(session))
            except Exception as e:
                logger.debug("FlexKV: goodbye to %s failed: %s", self.endpoint.address, e)
        self._closed = True
        self._heartbeat.join(timeout=1)
        self._drop_socket()
        self._ctx.destroy(linger=0)

    # ------------------------------------------------------------------------------------------------ keys

    def token_run(self, seed: np.ndarray, tokens: np.ndarray) -> wire.Run:
        return wire.run_message(seed, tokens, None)

    def hash_run(self, seed: np.ndarray, hashes: np.ndarray, tokens: np.ndarray) -> wire.Run:
        return wire.run_message(seed, tokens, hashes)

    # -------------------------------------------------------------------------------------------- protocol

    def get_match(self, run: wire.Run, first: int, seq_len: int) -> tuple[int, np.ndarray, int]:
        task, blocks, covered = self._call(lambda s: wire.GetMatch(s, run, int(first), int(seq_len)))
        return task, wire.ids_array(blocks), covered

    def put_match(self, run: wire.Run, first: int, seq_len: int) -> tuple[int, np.ndarray, int]:
        task, blocks, covered = self._call(lambda s: wire.PutMatch(s, run, int(first), int(seq_len)))
        return task, wire.ids_array(blocks), covered

    def lookup(self, run: wire.Run) -> tuple[int, int]:
        cpu, ssd = self._call(lambda s: wire.Lookup(s, run))
        return cpu, ssd

    def prefetch(self, run: wire.Run, seq_len: int) -> int:
        return self._call(lambda s: wire.Prefetch(s, run, int(seq_len)))

    def invalidate(self, run: wire.Run, start: int) -> int:
        return self._call(lambda s: wire.Invalidate(s, run, int(start)))

    def try_take(self, task: int) -> tuple[np.ndarray, np.ndarray] | None:
        taken = self._call(lambda s: wire.TryTake(s, int(task)))
        return None if taken is None else (wire.ids_array(taken[0]), wire.ids_array(taken[1]))

    def take(self, task: int, timeout: float) -> tuple[np.ndarray, np.ndarray]:
        """try_take until the blocks are up or ``timeout`` s passed; then take them as they are (blocks still
        coming up end the task failed, as in process)."""
        deadline = time.monotonic() + max(0.0, timeout)
        pause = _TRY_TAKE_POLL_S[0]
        while time.monotonic() < deadline:
            taken = self.try_take(task)
            if taken is not None:
                return taken
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _TRY_TAKE_POLL_S[1])
        seq, host = self._call(lambda s: wire.Take(s, int(task)))
        return wire.ids_array(seq), wire.ids_array(host)

    def complete(self, task: int, ok: bool, error: str) -> None:
        self._call(lambda s: wire.Complete(s, int(task), bool(ok), error))

    def cancel(self, tasks: list[int]) -> None:
        self._call(lambda s: wire.Cancel(s, [int(t) for t in tasks]))

    def wait(self, tasks: list[int], timeout: float, completely: bool = False) -> list[tuple]:
        """Waits in slices of at most timeout_s; tasks still running at ``timeout`` are reported TIMEOUT."""
        deadline = time.monotonic() + max(0.0, timeout)
        pending = [int(t) for t in tasks]
        ended: dict[int, tuple] = {}
        while True:
            left = max(0.0, deadline - time.monotonic())
            slice_s = min(left, self.timeout_s / 2)
            reports = self._call(lambda s, ids=pending, t=slice_s: wire.Wait(s, ids, t, completely),
                                 self.timeout_s + slice_s)
            last = [self._report(r) for r in reports]
            running = {int(_core.ReportStatus.TIMEOUT), int(_core.ReportStatus.UNREADY)}
            for r in last:
                if int(r[1]) not in running:
                    ended[r[0]] = r
            pending = [t for t in pending if t not in ended]
            if not pending or left <= 0:
                break
        by_task = {r[0]: r for r in last}
        by_task.update(ended)
        return [by_task[int(t)] for t in tasks if int(t) in by_task]

    def try_wait(self, tasks: list[int]) -> list[tuple]:
        return [self._report(r) for r in self._call(lambda s: wire.TryWait(s, [int(t) for t in tasks]))]

    @staticmethod
    def _report(r: list) -> tuple:
        task, status, seq_len, blocks, error = r
        return task, _core.ReportStatus(status), seq_len, wire.ids_array(blocks), error

    def reset(self) -> None:
        self._call(lambda s: wire.Reset(s))

    def tier_info(self) -> dict[str, Any]:
        """The CPU tier as the server shares it (a worker maps it with DataPlane)."""
        if self._session is None:
            self.connect()
        return dict(self._tier)

    def stats(self) -> dict[str, Any]:
        return self._request(wire.Stats(self._token))

    def counters(self) -> dict[str, Any]:
        return self.stats()["counters"]

    def index_counts(self) -> dict[str, Any]:
        return self.stats()["index"]

    # -------------------------------------------------------------------- engine memory (copies by ranks)

    def launch(self, tasks: list[int], targets: list[Any], slots: bool, layout: int, layerwise: bool,
               counter_id: int = 0) -> None:
        """Starts the copies of matched tasks on the ranks of this client's instance (``layout`` is the
        server's to choose); ``targets[i]`` is task i's slot mapping or why it is malformed; the ranks get
        ``counter_id`` with the orders of a layer-wise launch."""
        del slots, layout
        wire_targets = [wire.Target(error=t) if isinstance(t, str) else wire.Target(wire.ids_bytes(t)) for t in targets]
        self._call(lambda s: wire.Launch(s, [int(t) for t in tasks], wire_targets, bool(layerwise),
                                                  int(counter_id)))

    def ranks_ready(self) -> tuple[int, int]:
        """(ranks of this instance that registered their KV memory, ranks expected)."""
        got, want = self._call(lambda s: wire.RanksReady(s))
        return got, want

    def register_layout(self, *args: Any) -> int:
        raise TaskError("this KVManager is a client of `flexkv serve`: engine memory is registered by each rank "
                        "with the server (KVTPClient.register_to_server, or KVManager.register_kv_caches)")

    def unregister_layout(self, layout: int) -> None:
        return None

    def wait_layer(self, task: int, layer: int, stream: Any, timeout: float) -> bool:
        raise TaskError("wait_layer: the copies of a client of `flexkv serve` run in its ranks; each rank waits "
                        "for its own layers")


def query_stats(endpoint: str, token: str = "", timeout_s: float = 2.0) -> dict[str, Any]:
    """``flexkv stats``: the live counters of the server at ``endpoint``, without opening a session."""
    ep = parse_endpoint(endpoint, token)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep.address)
        sock.send_multipart([b"\0" * 8, wire.encode(wire.Stats(token))])
        if not sock.poll(int(timeout_s * 1000)):
            raise wire.ServerUnavailable(f"no FlexKV server answered at {endpoint} within {timeout_s:g} s")
        reply = wire.decode_reply(sock.recv_multipart()[1])
        if isinstance(reply, wire.Err):
            wire.raise_error(reply)
        return reply.value
    finally:
        ctx.destroy(linger=0)
