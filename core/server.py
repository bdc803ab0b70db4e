"""``flexkv serve``: the control plane as its own process, shared by every engine instance and rank of a node.

The server owns the tiers (the CPU tier's memory is handed to clients as a descriptor over a unix socket that
checks the caller's uid; the SSD files are the server's) and answers the protocol of ``core/wire.py`` on a
ZeroMQ ROUTER at ``server_recv_port``. Engine processes are its clients (``RemotePlane``): they match, take
the blocks of a task, copy them with their own data plane and complete the task. A client that stops
answering loses its tasks when its lease runs out (``server_sessions.py``).

One thread answers requests in order; waits run on a small pool so that they never hold the others up, and
each is capped at ``WAIT_SLICE_S`` (clients wait in slices, so a dead server costs them one slice at most).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np
import zmq

from . import wire
from .config import CacheConfig, ModelConfig, format_bytes
from .control_plane import checked_config, open_control_plane, remote_tier_of, shutdown_plane
from .endpoint import EndpointLock, parse_endpoint, private_umask
from .errors import FlexKVError, TaskError
from .rank_hub import RankHub, describe_model, rank_endpoint
from .remote_flow import RemoteFlow
from .remote_metrics import remote_section
from .server_sessions import Session, SessionTable

logger = logging.getLogger("flexkv")

WAIT_SLICE_S = 1.0  # the longest one Wait request blocks
_SESSIONLESS = (wire.Hello, wire.Stats)


class FlexKVServer:
    """Serves one control plane at ``endpoint``. ``token``: required of every client on tcp://. ``clock``:
    the lease clock (tests pass a fake one). ``plane_args`` go to ``open_control_plane``."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, endpoint: str, *, token: str = "",
                 lease_s: float = 10.0, clock: Callable[[], float] = time.monotonic, **plane_args: Any) -> None:
        self.model_config = model_config
        self.cache_config = checked_config(model_config, cache_config, server=True)
        self.endpoint = parse_endpoint(endpoint, token, serving=True)
        self.token = token
        self.lease_s = float(lease_s)
        self.clock = clock
        self._plane_args = plane_args
        self.plane: Any = None
        self.remote: RemoteFlow | None = None  # the plane's remote tier, when the config enables it
        self.sessions: SessionTable | None = None
        self.hub: RankHub | None = None
        self._lock = EndpointLock(self.endpoint)
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="flexkv-server-wait")
        self._replies = f"inproc://flexkv-replies-{id(self)}"
        self._local = threading.local()
        self.requests = 0
        self.refused = 0
        self.started = threading.Event()

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Takes the endpoint, opens the tiers and starts answering (in background threads)."""
        self._lock.acquire()
        try:
            self.plane = open_control_plane(self.model_config, self.cache_config, **self._plane_args)
            tier = remote_tier_of(self.plane)
            self.remote = RemoteFlow(self.plane, tier, self.cache_config.tokens_per_block) if tier else None
            self.sessions = SessionTable(self.plane, self.lease_s, self.clock)
            self.hub = RankHub(self.plane, rank_endpoint(self.endpoint.address),
                               describe_model(self.model_config, self.cache_config), token=self.token,
                               lease_s=self.lease_s, clock=self.clock).start()
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            with private_umask():
                router.bind(self.endpoint.address)
            self._lock.secure_socket()
            pull = self._ctx.socket(zmq.PULL)
            pull.bind(self._replies)
        except BaseException:
            self._release()
            raise
        self._threads = [threading.Thread(target=self._loop, args=(router, pull), name="flexkv-server", daemon=True),
                         threading.Thread(target=self._reaper, name="flexkv-server-leases", daemon=True)]
        for t in self._threads:
            t.start()
        self.started.set()
        logger.warning("FlexKV server (pid %d) at %s (ranks at %s): %s; lease %.1f s", os.getpid(),
                       self.endpoint.address, self.hub.endpoint.address, self.describe_tiers(), self.lease_s)

    def describe_tiers(self) -> str:
        c, block = self.cache_config, self.plane.block_bytes
        out = f"CPU tier {c.num_cpu_blocks} blocks x {format_bytes(block)} ({format_bytes(c.num_cpu_blocks * block)})"
        if c.enable_ssd:
            out += (f", SSD tier {c.num_ssd_blocks} blocks ({format_bytes(c.num_ssd_blocks * block)}) in "
                    f"{', '.join(c.ssd_cache_dirs)}")
        return out + f", {c.tokens_per_block} tokens per block"

    @property
    def stopped(self) -> bool:
        """True once close() was called or the request loop failed."""
        return self._stop.is_set()

    def close(self) -> None:
        """Stops answering, ends every session's tasks, lets copies in flight finish, closes the tiers and
        removes the socket and lock files. Idempotent."""
        self._stop.set()
        self._shutdown()

    def _shutdown(self) -> None:
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        if self.sessions is not None:
            self.sessions.close_all("the FlexKV server stopped")
        if self.hub is not None:
            self.hub.close()  # copies the ranks have begun may finish first
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._release()

    def _release(self) -> None:
        if self.hub is not None:
            self.hub.close(0)
        if self.plane is not None and not self.plane.closed:
            shutdown_plane(self.plane)  # copies in flight end first (and queued remote write-throughs)
        self._lock.release()
        self._ctx.term()

    # ------------------------------------------------------------------------------------------------ loop

    def _loop(self, router: zmq.Socket, pull: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):
                    if sock is pull:
                        router.send_multipart(pull.recv_multipart())
                        continue
                    frames = router.recv_multipart()
                    if len(frames) != 3:
                        self.refused += 1
                        continue  # not a FlexKV client: nothing to answer to
                    identity, rid, body = frames
                    reply = self._handle(identity, rid, body)
                    if reply is not None:
                        router.send_multipart([identity, rid, wire.encode(reply)])
        except Exception:
            logger.exception("FlexKV server: the request loop failed; stopping")
            self._stop.set()
        finally:
            router.close(0)
            pull.close(0)

    def _reaper(self) -> None:
        period = min(1.0, self.lease_s / 4)
        while not self._stop.wait(period):
            try:
                self.sessions.expire()
            except Exception:
                logger.exception("FlexKV server: ending expired sessions failed")

    def _handle(self, identity: bytes, rid: bytes, body: bytes) -> Any:
        self.requests += 1
        try:
            msg = wire.decode_request(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.refused += 1
            logger.warning("FlexKV server: refused a message of the wrong schema: %s", e)
            return wire.Err("schema", f"not a FlexKV request of protocol {wire.PROTOCOL}: {e}")
        try:
            if isinstance(msg, wire.Hello):
                return wire.Ok(self._hello(msg))
            if isinstance(msg, wire.Stats):
                self._check_token(msg.token)
                return wire.Ok(self.stats())
            session = self.sessions.touch(msg.session)
            if session is None:
                raise wire.ServerError("session", "unknown session: the server restarted or the client's lease ran "
                                       "out; reconnect")
            if isinstance(msg, wire.Wait) and msg.timeout > 0:
                done = self._call(session, wire.Wait(msg.session, msg.tasks, 0.0, msg.completely))
                if any(r[1] in _RUNNING for r in done):  # blocks a pool thread, not the loop
                    self._pool.submit(self._wait_later, session, msg, identity, rid)
                    return None
                return wire.Ok(done)
            return wire.Ok(self._call(session, msg))
        except Exception as e:
            if not isinstance(e, FlexKVError):
                logger.exception("FlexKV server: %s failed", type(msg).__name__)
            return wire.error_reply(e)

    def _wait_later(self, session: Session, msg: wire.Wait, identity: bytes, rid: bytes) -> None:
        try:
            reply: Any = wire.Ok(self._call(session, msg))
        except Exception as e:
            reply = wire.error_reply(e)
        push = getattr(self._local, "push", None)
        if push is None:
            push = self._local.push = self._ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(self._replies)
        push.send_multipart([identity, rid, wire.encode(reply)])

    # -------------------------------------------------------------------------------------------- requests

    def _check_token(self, token: str) -> None:
        if self.endpoint.scheme == "tcp" and token != self.token:
            raise wire.ServerError("auth", "wrong or missing server_token for this tcp:// server")

    def _hello(self, msg: wire.Hello) -> dict[str, Any]:
        self._check_token(msg.token)
        if msg.protocol != wire.PROTOCOL:
            raise wire.ServerError("protocol", f"the client speaks FlexKV protocol {msg.protocol}, this server "
                                   f"{wire.PROTOCOL}; run the same FlexKV version on both sides")
        mine = (self.plane.model_fingerprint, self.plane.tokens_per_block, self.plane.block_bytes)
        theirs = (msg.fingerprint, msg.tokens_per_block, msg.block_bytes)
        if mine != theirs:
            raise wire.ServerError("config", f"{msg.client} has model {msg.fingerprint!r}, {msg.tokens_per_block} "
                                   f"tokens per block ({msg.block_bytes} bytes); this server caches "
                                   f"{mine[0]!r}, {mine[1]} tokens per block ({mine[2]} bytes). Give each model its "
                                   "own server_recv_port, or the same model_config and tokens_per_block to both")
        session = self.sessions.open(msg.client, msg.pid, msg.instance)
        logger.info("FlexKV server: %s (pid %d, instance %d) connected", msg.client, msg.pid, msg.instance)
        return {"session": session.id, "lease_s": self.lease_s, "tier": dict(self.plane.tier_info()),
                "server_pid": os.getpid(), "host": socket.gethostname()}

    def _run(self, run: wire.Run) -> Any:
        seed, tokens, hashes = wire.run_arrays(run)
        if hashes is None:
            return self.plane.token_run(seed, tokens)
        return self.plane.hash_run(seed, hashes, tokens)

    def _run_of(self, run: wire.Run) -> Callable[[int], Any]:
        """n -> the run of the request's first n blocks (remote promotions)."""
        seed, tokens, hashes = wire.run_arrays(run)
        tpb = self.cache_config.tokens_per_block

        def run_of(n: int) -> Any:
            if hashes is None:
                return self.plane.token_run(seed, tokens[: n * tpb])
            return self.plane.hash_run(seed, hashes[:n], tokens[: n * tpb])
        return run_of

    def _call(self, s: Session, msg: Any) -> Any:
        p, remote = self.plane, self.remote
        if isinstance(msg, (wire.GetMatch, wire.PutMatch)):
            match = p.get_match if isinstance(msg, wire.GetMatch) else p.put_match
            run = self._run(msg.run)
            task, blocks, covered = match(run, msg.first, msg.seq_len)
            self.sessions.hold(s, task)
            if remote is not None and isinstance(msg, wire.PutMatch):
                remote.note_put(int(task), run, int(covered))
            return [int(task), wire.ids_bytes(blocks), int(covered)]
        if isinstance(msg, wire.Lookup):
            run = self._run(msg.run)
            if remote is not None:  # one Redis round trip, bounded by the tier's timeout and breaker
                cpu, ssd, deeper = remote.plan(run)
                return [cpu, max(cpu, ssd) + deeper]
            return list(p.lookup(run))
        if isinstance(msg, wire.Prefetch):
            run = self._run(msg.run)
            if remote is not None:  # remote blocks come up in a job of the tier's threads, not this loop
                task = remote.prefetch(run, self._run_of(msg.run), msg.seq_len)
                if not remote.is_job(task):
                    self.sessions.hold(s, task)
                return task
            task = int(p.prefetch(run, msg.seq_len))
            self.sessions.hold(s, task)
            return task
        if isinstance(msg, wire.Invalidate):
            return int(p.invalidate(self._run(msg.run), msg.start))
        if isinstance(msg, (wire.TryTake, wire.Take, wire.Complete)):
            self._check_owner(s, [msg.task])
        if isinstance(msg, (wire.TryTake, wire.Take)):
            taken = p.try_take(msg.task) if isinstance(msg, wire.TryTake) else p.take(msg.task, 0.0)
            return None if taken is None else [wire.ids_bytes(taken[0]), wire.ids_bytes(taken[1])]
        if isinstance(msg, wire.Complete):
            p.complete(msg.task, msg.ok, msg.error)
            self.sessions.release(s, [msg.task])
            if remote is not None:
                remote.put_ended(msg.task, msg.ok)
            return None
        if isinstance(msg, wire.Cancel):
            tasks = remote.split(list(msg.tasks))[0] if remote is not None else list(msg.tasks)
            p.cancel([t for t in tasks if int(t) in s.tasks])  # another session's task is not this one's
            return None
        if isinstance(msg, (wire.Wait, wire.TryWait)):
            tasks, jobs = remote.split(list(msg.tasks)) if remote is not None else (msg.tasks, [])
            timeout = min(max(0.0, msg.timeout), WAIT_SLICE_S) if isinstance(msg, wire.Wait) else None
            if not tasks:
                reports = []
            elif timeout is not None:
                reports = p.wait(tasks, timeout, msg.completely)
            else:
                reports = p.try_wait(tasks)
            if remote is not None:
                remote.reported(reports)
                reports = reports + remote.reports(jobs, timeout)
            out = [[int(t), int(st), int(n), wire.ids_bytes(np.asarray(b)), err] for t, st, n, b, err in reports]
            self.sessions.release(s, [r[0] for r in out if r[1] not in _RUNNING])
            return out
        if isinstance(msg, wire.Launch):
            layout = self.hub.layout_of(s.instance)
            if layout < 0:
                got, want = self.hub.ranks_of(s.instance)
                raise TaskError(f"launch: {got} of {want or 'the'} tensor-parallel ranks of instance {s.instance} "
                                "registered their KV memory; each rank registers it (KVTPClient.register_to_server, "
                                "or KVManager.register_kv_caches in the rank's process)")
            targets = [t.error if t.error else wire.ids_array(t.slots) for t in msg.targets]
            if msg.layerwise:
                self.hub.note_counter(msg.tasks, msg.counter_id)
            p.launch(msg.tasks, targets, True, layout, msg.layerwise)
            return None
        if isinstance(msg, wire.RanksReady):
            return list(self.hub.ranks_of(s.instance))
        if isinstance(msg, wire.Heartbeat):
            return None
        if isinstance(msg, wire.Bye):
            self.sessions.close(s.id, f"{s.client} disconnected")
            return None
        if isinstance(msg, wire.Reset):
            p.reset()
            return None
        raise wire.ServerError("schema", f"{type(msg).__name__} is not served")

    def _check_owner(self, s: Session, tasks: list[int]) -> None:
        """Refuses to take or complete another session's task: task ids start again in a restarted
        server, and a client that held task 5 of the old one must not end another client's task 5."""
        foreign = [int(t) for t in tasks if int(t) not in s.tasks]
        if foreign:
            raise TaskError(f"task {foreign[0]} is not a task of this session (it ended, or belonged to a server "
                            "that has restarted since)")
    def server_gauges(self) -> dict[str, float]:
        """The server's own numbers for its metrics endpoint (any thread)."""
        return {"server_sessions": len(self.sessions.describe()), "server_requests_total": self.requests,
                "server_refused_total": self.refused, "server_expired_sessions_total": self.sessions.expired}

    def stats(self) -> dict[str, Any]:
        p = self.plane
        return {"endpoint": self.endpoint.address, "pid": os.getpid(), "tiers": self.describe_tiers(),
                "counters": dict(p.counters()), "index": dict(p.index_counts()), "histograms": dict(p.histograms()),
                "gauges": dict(p.gauges()), "tokens_per_block": self.cache_config.tokens_per_block,
                "sessions": self.sessions.describe(),
                "ranks": self.hub.describe(),
                "expired_sessions": self.sessions.expired, "requests": self.requests, "refused": self.refused,
                "remote": remote_section(p)}


def _status_values(*names: str) -> frozenset[int]:
    from flexkv import _core

    return frozenset(int(getattr(_core.ReportStatus, n)) for n in names)


_RUNNING = _status_values("UNREADY", "TIMEOUT")
