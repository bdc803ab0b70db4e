"""The remote tier's two clients, each behind a circuit breaker: the object store (S3 through boto3, any
S3-compatible server) and the index (Redis through redis-py with hiredis).

Every request is bounded (connect and read timeouts of ``timeout_s``, ``retries`` extra attempts). A request
that fails because the server is unreachable or hung opens the breaker: for ``breaker_cooldown_s`` the
client refuses requests at once (``Unavailable``), then lets one through as a probe; its success closes the
breaker. Callers turn every failure into a miss or a skipped store.

The index of one namespace (bucket, prefix, object fingerprint) is a set of block keys (32 hex digits) in
Redis, beside a sorted set of the same keys scored by last access time (LRU). A prompt's lookup is one round
trip (SMISMEMBER of all its keys); promotions refresh the access times. A key with ``:claim:`` holds a
writer's claim on a block so that several nodes store it once; ``:built`` marks an index that holds the
bucket's listing (an index that lost it, a Redis restarted empty, is rebuilt from the bucket).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from .remote_settings import RemoteSettings, redact

logger = logging.getLogger("flexkv")
T = TypeVar("T")


class Unavailable(Exception):
    """A request not made or not answered: the server is down, hung or refused it."""


class CircuitBreaker:
    """Closed: requests go through. Open (after a failure that says the server is down): requests are
    refused for ``cooldown_s``, then one probe goes through (half-open); its success closes the breaker.

    ``server`` ("s3", "redis") and ``endpoint`` name the server in metrics; ``trips`` (closed -> open),
    ``failures`` (requests that raised) and ``refused`` (requests not sent while open) only grow."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
    STATES = (CLOSED, HALF_OPEN, OPEN)  # a state's index is its gauge value

    def __init__(self, name: str, cooldown_s: float, on_refused: Callable[[], None], *, server: str = "",
                 endpoint: str = "") -> None:
        self.name = name
        self.server = server or name.split(" ", 1)[0].lower()
        self.endpoint = endpoint
        self.cooldown_s = cooldown_s
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._open_until: float | None = None
        self._probing = False
        self.trips = 0
        self.failures = 0
        self.refused = 0

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    @property
    def state(self) -> str:
        """closed, open (refusing requests) or half_open (the cooldown passed: the next request, or the one
        in flight, is the probe)."""
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._open_until is None:
            return self.CLOSED
        return self.HALF_OPEN if self._probing or time.monotonic() >= self._open_until else self.OPEN

    def describe(self) -> dict[str, Any]:
        """The breaker's numbers for metrics: server, endpoint, state, trips, failures, refused."""
        with self._lock:
            return {"server": self.server, "endpoint": self.endpoint, "state": self._state(), "trips": self.trips,
                    "failures": self.failures, "refused": self.refused}

    def call(self, fn: Callable[[], T], is_down: Callable[[BaseException], bool]) -> T:
        with self._lock:
            if self._open_until is not None:
                if time.monotonic() < self._open_until or self._probing:
                    self.refused += 1
                    self._on_refused()
                    raise Unavailable(f"{self.name}: circuit open (the server failed recently)")
                self._probing = True
        try:
            out = fn()
        except BaseException as e:
            down = is_down(e)
            with self._lock:
                self.failures += 1
                self._probing = False
                if down:
                    if self._open_until is None:
                        self.trips += 1
                        logger.warning("FlexKV remote tier: %s is down (%s); not calling it for %.1f s", self.name,
                                       type(e).__name__, self.cooldown_s)
                    self._open_until = time.monotonic() + self.cooldown_s
            if down:
                raise Unavailable(f"{self.name}: {type(e).__name__}: {e}") from e
            raise
        with self._lock:
            if self._open_until is not None:
                logger.warning("FlexKV remote tier: %s answers again", self.name)
            self._open_until, self._probing = None, False
        return out


# --------------------------------------------------------------------------------------------- S3


def _s3_down(e: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 0
    return isinstance(e, (BotoCoreError, OSError))


class ObjectStore:
    """Whole objects in one bucket. ``get`` returns None for an object that does not exist."""

    def __init__(self, settings: RemoteSettings, on_refused: Callable[[], None]) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self.bucket = settings.bucket
        config = Config(
            connect_timeout=settings.timeout_s, read_timeout=settings.timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # retried here, without the SDK's backoff
            max_pool_connections=max(10, settings.max_concurrency + 2),
            s3={"addressing_style": settings.addressing_style},
            region_name=settings.region,
        )
        self.session = boto3.session.Session()
        self._client = self.session.client("s3", endpoint_url=settings.endpoint_url, config=config)
        where = settings.endpoint_url or f"AWS S3 ({settings.region})"
        self.breaker = CircuitBreaker(f"S3 {settings.endpoint_url or 'AWS'}", settings.breaker_cooldown_s,
                                      on_refused, server="s3", endpoint=where)

    @property
    def client(self) -> Any:
        return self._client

    def check(self) -> None:
        """Raises the client's own error when the bucket cannot be used (the caller words it)."""
        self._client.head_bucket(Bucket=self.bucket)

    def _call(self, fn: Callable[[], T]) -> T:
        """fn through the breaker, attempted 1 + retries times at once while the server looks down."""
        def attempts() -> T:
            for attempt in range(self.settings.retries + 1):
                try:
                    return fn()
                except Exception as e:
                    if attempt == self.settings.retries or not _s3_down(e):
                        raise
            raise AssertionError("unreachable")
        return self.breaker.call(attempts, _s3_down)

    def put(self, key: str, body: bytes) -> None:
        self._call(lambda: self._client.put_object(Bucket=self.bucket, Key=key, Body=body))

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        def fetch() -> bytes | None:
            try:
                return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        return self._call(fetch)

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i:i + 1000]]
            self._call(lambda c=chunk: self._client.delete_objects(  # type: ignore[misc]
                Bucket=self.bucket, Delete={"Objects": c, "Quiet": True}))

    def list(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last-modified time) of every object under ``prefix``."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(lambda k=kwargs: self._client.list_objects_v2(**k))  # type: ignore[misc]
            for obj in page.get("Contents", ()):
                yield obj["Key"], obj["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")


# -------------------------------------------------------------------------------------------- Redis


def _resp_head(count: int, args: list[bytes]) -> bytes:
    """The RESP header of a command of ``count`` arguments and its first ones."""
    return b"".join([b"*%d\r\n" % count] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


def _redis_down(e: BaseException) -> bool:
    import redis

    return isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError))


class BlockIndex:
    """The Redis index of one namespace's remote blocks (see the module's doc)."""

    CLAIM_MS = 30_000

    def __init__(self, settings: RemoteSettings, namespace: str, on_refused: Callable[[], None]) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s,
            retry=Retry(NoBackoff(), settings.retries), retry_on_timeout=True, health_check_interval=0,
            max_connections=64)
        base = f"flexkv:{namespace}"
        self.members, self.atimes = f"{base}:blocks", f"{base}:atime"
        self.claims, self.built = f"{base}:claim:", f"{base}:built"
        self.breaker = CircuitBreaker(f"Redis {settings.redis_url.split('@')[-1]}", settings.breaker_cooldown_s,
                                      on_refused, server="redis", endpoint=redact(settings.redis_url))
        self._head = _resp_head(2, [b"EXISTS", self.built.encode()])

    @property
    def client(self) -> Any:
        return self._redis

    def _run(self, fn: Callable[[], T]) -> T:
        return self.breaker.call(fn, _redis_down)

    def ping(self) -> None:
        self._redis.ping()

    def leading(self, hex_keys: bytes) -> tuple[int, bool]:
        """(how many leading members the index holds, whether it holds the bucket's listing) of members given
        as 32 hex digits each, back to back: one round trip (EXISTS and SMISMEMBER sent together, the request
        packed here in one piece and the answer parsed by hiredis, not argument by argument in Python)."""
        n = len(hex_keys) // 32
        if n == 0:
            return 0, True
        rows = np.empty((n, 39), dtype=np.uint8)
        rows[:, :5] = np.frombuffer(b"$32\r\n", dtype=np.uint8)
        rows[:, 5:37] = np.frombuffer(hex_keys, dtype=np.uint8).reshape(n, 32)
        rows[:, 37:] = np.frombuffer(b"\r\n", dtype=np.uint8)
        ask = _resp_head(n + 2, [b"SMISMEMBER", self.members.encode()])

        def go() -> tuple[int, bool]:
            pool = self._redis.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command([self._head, ask, rows.tobytes()])
                built = conn.read_response()
                present = conn.read_response()
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
            flags = np.asarray(present, dtype=np.int8)
            misses = np.flatnonzero(flags == 0)
            return (int(misses[0]) if len(misses) else n), bool(built)
        return self._run(go)

    def touch(self, members: Sequence[str]) -> None:
        """Marks members used now (LRU); members no longer indexed are not added back."""
        if members:
            self._run(lambda: self._redis.zadd(self.atimes, dict.fromkeys(members, time.time()), xx=True))

    def claim(self, members: Sequence[str], owner: str) -> list[bool]:
        """Claims the members not in the index: True for those this caller must store."""
        def go() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            pipe.smismember(self.members, list(members))
            for m in members:
                pipe.set(self.claims + m, owner, nx=True, px=self.CLAIM_MS)
            return pipe.execute()
        out = self._run(go)
        return [not s and bool(c) for s, c in zip(out[0], out[1:])]

    def add(self, members: Sequence[str], claimed: Sequence[str]) -> int:
        """Adds stored members, drops the claims; returns the index's size."""
        def go() -> list[Any]:
            pipe = self._redis.pipeline(transaction=True)
            if members:
                pipe.sadd(self.members, *members)
                pipe.zadd(self.atimes, dict.fromkeys(members, time.time()), nx=True)
            if claimed:
                pipe.delete(*[self.claims + m for m in claimed])
            pipe.scard(self.members)
            return pipe.execute()
        return int(self._run(go)[-1])

    def remove(self, members: Sequence[str]) -> None:
        if members:
            def go() -> None:
                pipe = self._redis.pipeline(transaction=True)
                pipe.srem(self.members, *members)
                pipe.zrem(self.atimes, *members)
                pipe.execute()
            self._run(go)

    def pop_oldest(self, count: int) -> list[str]:
        """Removes the ``count`` least recently used members; returns them."""
        popped = [m.decode() if isinstance(m, bytes) else m
                  for m, _ in self._run(lambda: self._redis.zpopmin(self.atimes, count))]
        if popped:
            self._run(lambda: self._redis.srem(self.members, *popped))
        return popped

    def size(self) -> int:
        return int(self._run(lambda: self._redis.scard(self.members)))

    def begin_rebuild(self, owner: str) -> bool:
        """True when this caller rebuilds the index (one node at a time)."""
        return bool(self._run(lambda: self._redis.set(self.built + ":rebuilding", owner, nx=True, px=60_000)))

    def load(self, members: dict[str, float]) -> None:
        """Adds members with their access times and marks the index built (a rebuild from the bucket)."""
        def go() -> None:
            pipe = self._redis.pipeline(transaction=False)
            items = list(members.items())
            for i in range(0, len(items), 5000):
                chunk = dict(items[i:i + 5000])
                pipe.sadd(self.members, *chunk)
                pipe.zadd(self.atimes, chunk, nx=True)
            pipe.set(self.built, "1")
            pipe.delete(self.built + ":rebuilding")
            pipe.execute()
        self._run(go)


__all__ = ["BlockIndex", "CircuitBreaker", "ObjectStore", "Unavailable"]
