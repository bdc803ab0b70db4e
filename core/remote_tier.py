"""RemoteTier: the third tier of a control plane, on S3 (or any S3-compatible store) with a Redis index.

It drives the control plane through its public protocol, as the SSD flow does inside the core:

- **write-through**: a put that ended well is queued (``queue_write``); a writer thread claims the blocks the
  index lacks (one round trip; several nodes writing the same block store it once), packs their images
  from the CPU tier with ``export_blocks`` (blocks locked meanwhile; the SSD header and checksums included),
  uploads them with bounded concurrency and adds them to the index; past ``num_remote_blocks`` the least
  recently used blocks leave the index and the bucket.
- **promotion**: ``promote`` reserves CPU blocks for remote-only blocks with ``put_match``, takes them,
  downloads the objects in parallel, has ``import_blocks`` verify each (fingerprint, key, parent, position,
  token ids, payload checksum) and copy it in, and completes the put (the blocks then also reach the SSD
  tier). An object that does not verify, or is gone, is a miss: it leaves the index.

Objects live at ``<prefix><fingerprint>/<2 hex>/<32 hex key>`` so that models and layouts never meet and
requests spread over prefixes. Faults (S3 or Redis down, hung, refusing) become misses or skipped stores,
counted in the control plane's counters (``remote_*``) and logged; every request is bounded (see
core/remote_clients.py).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import ConfigError
from .progress import Progress
from .remote_clients import BlockIndex, ObjectStore, Unavailable
from .remote_settings import RemoteSettings, redact

logger = logging.getLogger("flexkv")

RunOf = Callable[[int], Any]  # n -> the KeyRun of a request's first n blocks
_EXPORT_BYTES = 64 << 20      # images packed at once by the writer


def key_hex(keys: np.ndarray) -> str:
    """The index members (32 hex digits each, high word first) of (n, 2) uint64 block keys [lo, hi], back to
    back."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 2)
    be = np.empty(keys.shape, dtype=">u8")
    be[:, 0], be[:, 1] = keys[:, 1], keys[:, 0]
    return be.tobytes().hex()


def key_members(keys: np.ndarray) -> list[str]:
    """The index members (32 hex digits, high word first) of (n, 2) uint64 block keys [lo, hi]."""
    text = key_hex(keys)
    return [text[i:i + 32] for i in range(0, len(text), 32)]


def _require_clients() -> None:
    try:
        import boto3  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"cache_config.enable_remote needs the S3 and Redis clients ({e}); install them with "
                          "pip install 'flexkv[remote]' (boto3, redis, hiredis)", "cache_config.enable_remote") from e


def leading(flags: Any) -> int:
    """How many leading entries are true."""
    arr = np.asarray(flags, dtype=bool)
    bad = np.flatnonzero(~arr)
    return int(bad[0]) if len(bad) else len(arr)


class RemoteTier:
    """The remote tier of one control plane (see the module's doc). ``start`` checks the bucket, the
    credentials and Redis and raises a ConfigError naming the key to fix."""

    def __init__(self, plane: Any, settings: RemoteSettings) -> None:
        self.plane = plane
        self.settings = settings
        _require_clients()
        fp = f"{int(plane.object_fingerprint):016x}"
        self.key_prefix = f"{settings.prefix}{fp}/"
        self.store = ObjectStore(settings, lambda: self.count(remote_refused_requests=1))
        self.index = BlockIndex(settings, f"{settings.bucket}/{self.key_prefix}",
                                lambda: self.count(remote_refused_requests=1))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.read_only = False
        self._io = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="flexkv-remote-io")
        self._jobs = ThreadPoolExecutor(2, thread_name_prefix="flexkv-remote-promote")
        self._mu = threading.Condition()
        self._queue: collections.deque[tuple[Any, int]] = collections.deque()
        self._queued_blocks = 0
        self._writing = False
        self._writing_blocks = 0
        self._closing = False
        self._rebuilding = False
        self._size: int | None = None  # blocks in the index, as last seen
        self._writer = threading.Thread(target=self._write_loop, name="flexkv-remote-writer", daemon=True)

    # ----------------------------------------------------------------------------------- lifecycle

    def object_key(self, member: str) -> str:
        return f"{self.key_prefix}{member[:2]}/{member}"

    def start(self) -> RemoteTier:
        s, path = self.settings, "cache_config.remote_cache_path"
        where = s.endpoint_url or f"AWS S3 ({s.region})"
        if self.store.session.get_credentials() is None:  # the standard AWS chain found nothing
            raise ConfigError(f"{path}: no AWS credentials for s3://{s.bucket}/: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE) or an instance role", path)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.store.check()
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(f"{path}: bucket {s.bucket!r} does not exist at {where}; create it (e.g. `aws s3 "
                                  f"mb s3://{s.bucket}`) or point remote_cache_path at an existing one", path) from e
            if code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(f"{path}: the AWS credentials may not use bucket {s.bucket!r} at {where} ({code}); "
                                  "fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the bucket's policy", path) from e
            raise ConfigError(f"{path}: bucket {s.bucket!r} at {where} answered {code}: {e}", path) from e
        except BotoCoreError as e:
            key = "cache_config.remote_config_custom.endpoint"
            raise ConfigError(f"{key}: cannot reach S3 at {where} ({e}); fix the endpoint (or AWS_ENDPOINT_URL_S3) "
                              "or start the server", key) from e
        try:
            self.index.ping()
        except Exception as e:
            key = "cache_config.remote_config_custom.redis_url"
            raise ConfigError(f"{key}: cannot reach Redis at {redact(s.redis_url)} ({type(e).__name__}: {e}); fix "
                              "redis_url (or FLEXKV_REDIS_URL) or start Redis", key) from e
        self._check_writable()
        self._writer.start()
        self._start_io_threads()
        self.lookup(np.zeros((1, 2), dtype=np.uint64), count=False)  # rebuilds an empty index from the bucket
        self.index_size()  # metrics show the index's size without asking Redis again
        logger.info("FlexKV remote tier: %s%s", s.describe(), " (read-only credentials)" if self.read_only else "")
        return self

    def _start_io_threads(self) -> None:
        """Starts every I/O thread now: a request's first downloads must not wait for threads to start."""
        n = self.settings.max_concurrency
        ready = threading.Barrier(n + 1)
        for _ in range(n):
            self._io.submit(ready.wait, 5.0)
        ready.wait(5.0)

    def _check_writable(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.store.client.put_object(Bucket=self.settings.bucket, Key=f"{self.key_prefix}.writable", Body=b"")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("403", "AccessDenied", "Forbidden"):
                self.read_only = True
                logger.warning("FlexKV remote tier: the credentials may not write to s3://%s/%s: the tier only "
                               "reads (write-throughs are skipped and counted)", self.settings.bucket,
                               self.key_prefix)
                return
            logger.warning("FlexKV remote tier: probing write access to s3://%s/%s failed (%s); assuming it may "
                           "write", self.settings.bucket, self.key_prefix, e)
        except Exception as e:  # a transient fault: the write-throughs find out and count it
            logger.warning("FlexKV remote tier: probing write access to s3://%s/%s failed (%s); assuming it may "
                           "write", self.settings.bucket, self.key_prefix, e)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Lets queued write-throughs finish (up to ``timeout`` s), then stops the threads: the blocks still
        queued are skipped (counted), the uploads in flight end within their bound."""
        self.flush(timeout)
        with self._mu:
            self._closing = True
            dropped = self._queued_blocks - (self._writing_blocks if self._writing else 0)
            self._queue.clear()
            self._queued_blocks -= dropped
            self._mu.notify_all()
        if dropped:
            self.count(remote_write_skipped_blocks=dropped)
            logger.warning("FlexKV remote tier: shutting down with %d block(s) not written through yet; skipped",
                           dropped)
        if self._writer.is_alive():
            self._writer.join(timeout)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)

    def count(self, **values: int) -> None:
        """Adds to the control plane's remote_* counters (one call per batch of blocks)."""
        values = {k: v for k, v in values.items() if v}
        if values:
            self.plane.add_counters(values)

    def observe(self, timer: str, seconds: float) -> None:
        """Records one job's latency in the control plane's histogram ``timer``."""
        try:
            self.plane.observe_latency(timer, seconds)
        except Exception as e:  # a plane shut down under a last job: the latency is not needed any more
            logger.debug("FlexKV remote tier: latency of %s not recorded: %s", timer, e)

    def describe(self) -> dict[str, Any]:
        """What metrics show of the tier now, without a request to Redis or S3: its capacity, the blocks in
        the index as last seen (None before the first write-through or size query), the write-through queue
        and each server's circuit breaker (``CircuitBreaker.describe``)."""
        with self._mu:
            queued = self._queued_blocks
            rebuilding = self._rebuilding
        return {"capacity": self.settings.num_blocks, "index_blocks": self._size, "write_queue_blocks": queued,
                "rebuilding": rebuilding, "read_only": self.read_only,
                "servers": [self.store.breaker.describe(), self.index.breaker.describe()]}

    # -------------------------------------------------------------------------------------- lookup

    def lookup(self, keys: np.ndarray, count: bool = True) -> int:
        """How many leading blocks of ``keys`` the index holds (one round trip; 0 when it cannot answer); the
        others count as remote misses unless ``count`` is False (a probe)."""
        if len(keys) == 0:
            return 0
        asked = len(keys) if count else 0
        try:
            n, built = self.index.leading(key_hex(keys).encode())
        except Unavailable:
            self.count(remote_index_errors=1, remote_miss_blocks=asked)
            return 0
        except Exception as e:
            self.count(remote_index_errors=1, remote_miss_blocks=asked)
            logger.warning("FlexKV remote tier: index lookup failed: %s", e)
            return 0
        if not built:
            self.count(remote_miss_blocks=asked)
            self._start_rebuild()
            return 0
        self.count(remote_miss_blocks=asked and asked - n)
        return n

    def index_size(self) -> int | None:
        """Blocks in the index as of the last write-through (asked from Redis once; None if it cannot
        answer): stats readers never wait for Redis again."""
        if self._size is None:
            try:
                self._size = self.index.size()
            except Exception:
                return None
        return self._size

    def _start_rebuild(self) -> None:
        with self._mu:
            if self._rebuilding or self._closing:
                return
            self._rebuilding = True
        threading.Thread(target=self._rebuild, name="flexkv-remote-rebuild", daemon=True).start()

    def _rebuild(self) -> None:
        try:
            if not self.index.begin_rebuild(self.owner):
                return
            where = f"s3://{self.settings.bucket}/{self.key_prefix}"
            progress = Progress(f"FlexKV remote tier: rebuilding the index of {where} from the bucket",
                                "objects listed", "blocks found")
            members: dict[str, float] = {}
            listed = 0
            for key, mtime in self.store.list(self.key_prefix):
                listed += 1
                name = key.rsplit("/", 1)[-1]
                if len(name) == 32 and all(c in "0123456789abcdef" for c in name):
                    members[name] = mtime
                if listed % 1000 == 0:  # the end of a listing page
                    progress.step(listed, len(members))
            self.index.load(members)
            self._size = None
            logger.warning("FlexKV remote tier: rebuilt the index of %s from the bucket: %d blocks (%d objects listed "
                           "in %.2f s)", where, len(members), listed, progress.elapsed())
        except Exception as e:
            self.count(remote_index_errors=1)
            logger.warning("FlexKV remote tier: rebuilding the index failed (%s); retried at the next lookup", e)
        finally:
            with self._mu:
                self._rebuilding = False

    # ---------------------------------------------------------------------------------- promotion

    def submit(self, fn: Callable[..., int], *args: Any) -> Future[int]:
        """Runs a promotion job on the tier's job threads."""
        return self._jobs.submit(fn, *args)

    def promote(self, run_of: RunOf, first: int, n: int, seq_len: int) -> int:
        """Brings blocks [first, first + n) of a request, which the index holds and the CPU tier lacks, into
        the CPU tier; returns how many leading ones arrived (never raises: a fault is a miss).

        The objects are downloaded first; CPU blocks are reserved (``put_match``) only for the leading ones
        that arrived, verified and copied in (``import_blocks``), and the put completed. A block that does not
        verify ends that put unstored; a second put then keeps the blocks before it."""
        started = time.monotonic()
        try:
            run = run_of(first + n)
            members = key_members(run.keys)
            bodies = self._download(members[first:first + n])
            got = leading([b is not None for b in bodies])
            if got == 0:
                return 0
            objects = {first + i: bodies[i] for i in range(got)}
            arrived = self._promote_once(run if got == n else run_of(first + got), first, seq_len, objects, members)
            if 0 < arrived < got:  # a block did not verify: keep the blocks before it
                arrived = self._promote_once(run_of(first + arrived), first, seq_len, objects, members)
            return arrived
        except Exception as e:
            logger.warning("FlexKV remote tier: promotion failed: %s", e)
            return 0
        finally:
            self.observe("remote_promotion", time.monotonic() - started)

    def _promote_once(self, run: Any, first: int, seq_len: int, objects: dict[int, bytes | None],
                      members: list[str]) -> int:
        plane = self.plane
        task, _, _ = plane.put_match(run, first, seq_len)
        ok_all = False
        try:
            positions, _ = plane.take(task, 0.0)
            positions = [int(p) for p in positions]
            ok = plane.import_blocks(task, [objects.get(p) for p in positions])
            good = leading(ok)
            ok_all = good == len(positions)
            self._drop_bad(positions, members, objects, ok)
        finally:
            plane.complete(task, ok_all, "" if ok_all else "remote blocks did not verify")
        if ok_all:
            self.count(remote_hit_blocks=len(positions))
            self._touch([members[p] for p in positions])
            return len(run.keys) - first
        return positions[good] - first  # the blocks before the first bad one are cached or verified

    def _download(self, members: list[str]) -> list[bytes | None]:
        def get(m: str) -> bytes | None | Exception:
            try:
                return self.store.get(self.object_key(m))
            except Exception as e:  # counted by the caller
                return e
        results = list(self._io.map(get, members))
        errors = sum(isinstance(r, Exception) for r in results)
        got = [r for r in results if isinstance(r, bytes)]
        self.count(remote_read_errors=errors, remote_read_blocks=len(got), remote_read_bytes=sum(map(len, got)))
        gone = [m for m, r in zip(members, results) if r is None]
        if gone:  # deleted behind the index's back: a miss, and no longer indexed
            self.count(remote_read_errors=len(gone))
            self._forget(gone, delete=False)
        return [None if isinstance(r, Exception) else r for r in results]

    def _drop_bad(self, positions: list[int], members: list[str], objects: dict[int, bytes | None],
                  ok: np.ndarray) -> None:
        bad = [members[p] for p, good in zip(positions, ok) if not good and objects.get(p) is not None]
        if bad:
            logger.warning("FlexKV remote tier: %d object(s) did not verify (wrong, torn or replaced); dropped",
                           len(bad))
            self.count(remote_mismatch_blocks=len(bad))
            self._forget(bad, delete=True)
            for p, good in zip(positions, ok):
                if not good:
                    objects[p] = None

    def _touch(self, members: list[str]) -> None:
        try:
            self.index.touch(members)
        except Exception as e:  # an access time left stale only ages the block
            logger.debug("FlexKV remote tier: touching %d block(s) failed: %s", len(members), e)

    def _forget(self, members: list[str], delete: bool) -> None:
        try:
            self.index.remove(members)
            if delete and not self.read_only:
                self.store.delete([self.object_key(m) for m in members])
        except Exception as e:
            logger.warning("FlexKV remote tier: dropping %d bad block(s) failed: %s", len(members), e)

    # ------------------------------------------------------------------------------ write-through

    def queue_write(self, run: Any, n: int) -> None:
        """Writes the run's first n blocks (ready in the CPU tier) through to the remote tier, later."""
        if n <= 0:
            return
        with self._mu:
            if self.read_only or self._closing or self._queued_blocks + n > self.settings.write_queue_blocks:
                skipped = True
            else:
                skipped = False
                self._queue.append((run, n))
                self._queued_blocks += n
                self._mu.notify_all()
        if skipped:
            self.count(remote_write_skipped_blocks=n)

    def flush(self, timeout: float) -> bool:
        """Waits until every queued write-through ended; False on timeout."""
        with self._mu:
            return self._mu.wait_for(lambda: not self._queue and not self._writing, timeout)

    def _write_loop(self) -> None:
        while True:
            with self._mu:
                self._mu.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                run, n = self._queue.popleft()
                self._writing, self._writing_blocks = True, n
            started = time.monotonic()
            try:
                self._write(run, n)
            except Exception as e:
                self.count(remote_write_skipped_blocks=n)
                logger.warning("FlexKV remote tier: write-through of %d block(s) skipped: %s: %s", n,
                               type(e).__name__, e)
            finally:
                self.observe("remote_write_through", time.monotonic() - started)
                with self._mu:
                    self._queued_blocks -= n
                    self._writing = False
                    self._mu.notify_all()

    def _write(self, run: Any, n: int) -> None:
        members = key_members(np.asarray(run.keys)[:n])
        try:
            claimed = self.index.claim(members, self.owner)
        except Unavailable:
            self.count(remote_index_errors=1, remote_write_skipped_blocks=n)
            return
        todo = np.flatnonzero(np.asarray(claimed, dtype=bool))
        if len(todo) == 0:
            return
        per = max(1, _EXPORT_BYTES // int(self.plane.object_bytes))
        stored: list[str] = []
        failed = k = sent = 0
        try:
            while k < len(todo):  # pack and upload the claimed blocks, at most _EXPORT_BYTES at a time
                start = int(todo[k])
                stop = min(n, start + per)
                images = self.plane.export_blocks(run, start, stop)
                end = int(np.searchsorted(todo, start + len(images)))
                rows = [int(i) for i in todo[k:end]]
                done = self._upload([(members[i], images[i - start]) for i in rows])
                stored += [members[i] for i, ok in zip(rows, done) if ok]
                sent += sum(int(images[i - start].nbytes) for i, ok in zip(rows, done) if ok)
                failed += len(rows) - sum(done)
                k = end
                if len(images) < stop - start:  # a block left the CPU tier: the rest cannot be packed
                    break
        finally:
            unwritten = len(todo) - len(stored) - failed
            self.count(remote_written_blocks=len(stored), remote_write_errors=failed,
                       remote_write_skipped_blocks=unwritten, remote_write_bytes=sent)
            try:
                size = self.index.add(stored, [members[int(i)] for i in todo])
            except Unavailable:
                self.count(remote_index_errors=1)
                return
        self._size = size
        if size > self.settings.num_blocks:
            self._evict(size - self.settings.num_blocks)

    def _upload(self, items: list[tuple[str, np.ndarray]]) -> list[bool]:
        def put(item: tuple[str, np.ndarray]) -> bool:
            try:
                self.store.put(self.object_key(item[0]), item[1].tobytes())
                return True
            except Exception as e:
                logger.debug("FlexKV remote tier: upload failed: %s", e)
                return False
        return list(self._io.map(put, items))

    def _evict(self, excess: int) -> None:
        try:
            old = self.index.pop_oldest(excess)
            self.count(remote_evicted_blocks=len(old))
            if self._size is not None:
                self._size -= len(old)
            if old:
                self.store.delete([self.object_key(m) for m in old])
        except Exception as e:
            logger.warning("FlexKV remote tier: evicting %d block(s) failed: %s", excess, e)


__all__ = ["RemoteTier", "key_members", "leading"]
