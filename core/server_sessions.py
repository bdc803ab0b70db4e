"""The server's clients: a session per connected engine process, its lease, and the tasks it holds.

A session lives while its client talks (any request, or the heartbeat the client sends every third of the
lease). When the lease runs out (the client was killed, or hangs) the server ends every task the session
still holds: a matched task is cancelled (its blocks unlocked), a task taken for a copy ends failed (a store
never becomes readable, a load's blocks are unlocked). Session ids are random 128-bit strings: over tcp://
they are as good as the token that opened them.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import FlexKVError

logger = logging.getLogger("flexkv")


@dataclass
class Session:
    id: str
    client: str
    pid: int
    instance: int
    last_seen: float
    tasks: set[int] = field(default_factory=set)

    def describe(self, now: float) -> dict[str, Any]:
        return {"client": self.client, "pid": self.pid, "instance": self.instance, "tasks": len(self.tasks),
                "idle_s": round(now - self.last_seen, 3)}


class SessionTable:
    """Sessions by id. ``clock`` is injectable (tests run leases on a fake clock)."""

    def __init__(self, plane: Any, lease_s: float, clock: Callable[[], float]) -> None:
        self.plane = plane
        self.lease_s = lease_s
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.expired = 0  # sessions ended by their lease, for stats

    def open(self, client: str, pid: int, instance: int) -> Session:
        s = Session(secrets.token_hex(16), client, pid, instance, self.clock())
        with self._lock:
            self._sessions[s.id] = s
        return s

    def touch(self, session_id: str) -> Session | None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is not None:
                s.last_seen = self.clock()
            return s

    def hold(self, session: Session, task: int) -> None:
        with self._lock:
            session.tasks.add(int(task))

    def release(self, session: Session, tasks: Iterable[int]) -> None:
        with self._lock:
            session.tasks.difference_update(int(t) for t in tasks)

    def close(self, session_id: str, why: str) -> Session | None:
        """Ends a session and every task it holds."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is not None:
            self._end_tasks(s, why)
        return s

    def expire(self) -> list[Session]:
        """Ends the sessions whose lease ran out; returns them."""
        now = self.clock()
        with self._lock:
            dead = [s for s in self._sessions.values() if now - s.last_seen > self.lease_s]
            for s in dead:
                del self._sessions[s.id]
        for s in dead:
            self.expired += 1
            logger.warning("FlexKV server: %s (pid %d) sent nothing for %.1f s (lease %.1f s); ending its %d tasks",
                           s.client, s.pid, now - s.last_seen, self.lease_s, len(s.tasks))
            self._end_tasks(s, f"the client's lease ran out ({s.client}, pid {s.pid})")
        return dead

    def close_all(self, why: str) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            self._end_tasks(s, why)

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return [s.describe(now) for s in self._sessions.values()]

    def _end_tasks(self, s: Session, why: str) -> None:
        """Cancels what is matched; fails what was taken for a copy. Tasks that ended already are skipped."""
        tasks = sorted(s.tasks)
        s.tasks.clear()
        if not tasks or self.plane.closed:
            return
        self.plane.cancel(tasks)
        for task in tasks:
            try:
                self.plane.complete(task, False, why)
            except FlexKVError:
                pass  # not taken (cancelled above, a prefetch, or gone): nothing of it is left to end
