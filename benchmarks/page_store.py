"""PageStore (FlexKV as SGLang HiCache's storage backend) against a plain memcpy of the same bytes.

The caller's memory is laid out as SGLang's ``page_first`` host pool: each page is a K chunk and a V chunk
in two halves of one buffer. Batches of 128 pages (SGLang's STORAGE_BATCH_SIZE) with random page ids are
stored (``put``: reserve + copy into the CPU tier) and loaded (``get``: acquire + copy out) under fresh
keys; ``exists`` answers for the batch. The peer is one single-threaded contiguous memcpy of the batch's
bytes, timed in the same run (the copy engine uses two threads, so it can pass it). The CPU tier holds two
rounds of batches, so from the third round on stores reuse blocks whose pages are already mapped (the
steady state of a full cache); best of the rounds. CPU tier only (the SSD tier is measured by
benchmarks/ssd_bandwidth.py).

    python -P benchmarks/page_store.py [--page-kib 256] [--batches 16] [--repeat 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from flexkv import _core
from flexkv.core.config import CacheConfig, ModelConfig
from flexkv.core.layout import EngineLayout
from flexkv.core.page_store import PageStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # timing.py; `python -P` leaves it off sys.path
from timing import best_of  # noqa: E402

BATCH = 128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page-kib", type=int, default=256, help="bytes of one page (K and V, all layers)")
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--repeat", type=int, default=6, help="rounds (at least 3)")
    args = p.parse_args()
    page = args.page_kib << 10
    tpb, layers = 64, 8
    head = page // (2 * layers * tpb * 2)
    model = ModelConfig(num_layers=layers, num_kv_heads=1, head_size=head, dtype="bfloat16")
    num_pages = BATCH * args.batches
    store = PageStore(model, CacheConfig(tokens_per_block=tpb, num_cpu_blocks=num_pages * 2),
                      namespace="bench", layout_tag="page_first")
    half = page // 2
    pool = np.ones((2, num_pages, half), dtype=np.uint8)  # touched: K pages, then V pages
    segments = np.array([[pool[0].ctypes.data, half, 0, half], [pool[1].ctypes.data, half, half, half]],
                        dtype=np.int64)
    layout = EngineLayout(segments=segments, num_blocks=num_pages, block_bytes=page, keepalive=[pool])
    rng = np.random.default_rng(0)
    src = np.ones(BATCH * page, dtype=np.uint8)
    dst = np.ones(BATCH * page, dtype=np.uint8)
    t_memcpy = best_of(lambda: _core.memcpy(dst.ctypes.data, src.ctypes.data, BATCH * page), args.repeat)

    def keys(n: int) -> np.ndarray:
        return store.keys([os.urandom(32).hex() for _ in range(n)])

    put_t, get_t, exists_t = [], [], []
    for _ in range(args.repeat):
        batches = [(keys(BATCH), rng.permutation(num_pages)[:BATCH].astype(np.int64)) for _ in range(args.batches)]
        t0 = time.perf_counter()
        for k, pages in batches:
            assert store.put(k, layout, pages).all()
        put_t.append((time.perf_counter() - t0) / args.batches)
        t0 = time.perf_counter()
        for k, _ in batches:
            assert store.exists(k) == BATCH
        exists_t.append((time.perf_counter() - t0) / args.batches)
        t0 = time.perf_counter()
        for k, pages in batches:
            assert store.get(k, layout, pages[::-1].copy()) == BATCH
        get_t.append((time.perf_counter() - t0) / args.batches)
    gb = BATCH * page / 1e9
    ceiling = gb / t_memcpy
    print(f"page_store: {BATCH} pages of {args.page_kib} KiB per batch, {args.batches} batches, best of "
          f"{args.repeat}; ratio = GB/s / contiguous memcpy GB/s of the batch's bytes (same run)")
    print(f"  memcpy (peer)  {ceiling:8.2f} GB/s")
    for name, times in (("put", put_t), ("get", get_t)):
        rate = gb / min(times)
        print(f"  {name:<14} {rate:8.2f} GB/s  ratio {rate / ceiling:5.2f}")
    print(f"  exists          {min(exists_t) * 1e6 / BATCH:8.2f} us per key")
    store.close()


if __name__ == "__main__":
    main()
