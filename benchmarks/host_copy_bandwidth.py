"""Host copy engine bandwidth for scattered blocks vs contiguous memcpy of the same bytes, on 1 and 2 threads.

The engine side is a vLLM-like per-layer layout (K and V of every layer in their
own arrays, so a block is 2 * layers chunks in different places); block ids on
both sides are random permutations. The layout is registered with the engine
once; each timed copy is one submit and its wait. Two ceilings are measured in
the same run, between two contiguous buffers of the same number of bytes: one
thread's memcpy, and two threads each memcpy'ing half. A row with N engine
threads is divided by the N-thread memcpy. A third peer, "contiguous", is the
engine itself copying the same bytes between the two contiguous buffers (1 MiB
blocks in order, its streaming stores on N threads): the share of it that the
scattered copy keeps is what scattering costs. Every buffer holds random bytes (no two pages alike, so
a hypervisor cannot merge them). Measurements of the ceilings and of the engine
are interleaved round by round, and the best round of each counts, so a noisy
neighbour slows both alike.

    python benchmarks/host_copy_bandwidth.py [--total-mib 256] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flexkv import _core


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=n, dtype=np.uint8)


def interleaved_best(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Seconds of the fastest of `repeat` runs of each function, the functions taking turns in every round."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run(chunk: int, total: int, threads: int, repeat: int, pool: ThreadPoolExecutor,
        layers: int = 4) -> dict[str, float]:
    segs_per_block = 2 * layers
    block_bytes = chunk * segs_per_block
    n_blocks = total // block_bytes
    nbytes = n_blocks * block_bytes
    rng = np.random.default_rng(chunk + threads)
    engine = [random_bytes(rng, n_blocks * chunk) for _ in range(segs_per_block)]
    host = random_bytes(rng, nbytes)
    segments = np.array([[e.ctypes.data, chunk, s * chunk, chunk] for s, e in enumerate(engine)], dtype=np.int64)
    e_ids = rng.permutation(n_blocks).astype(np.int64)
    h_ids = rng.permutation(n_blocks).astype(np.int64)
    copy_engine = _core.HostCopyEngine(threads)
    copy_engine.register_host(host.ctypes.data, nbytes)
    layout = copy_engine.register_layout(segments, n_blocks, host.ctypes.data, block_bytes, n_blocks)

    def scattered(direction: str) -> None:
        copy_engine.wait(copy_engine.submit(direction, layout, e_ids, h_ids))

    src = random_bytes(rng, nbytes)
    dst = np.empty(nbytes, dtype=np.uint8)  # touched by the warm-up
    half = nbytes // 2

    big = 1 << 20  # the contiguous peer: src -> dst as 1 MiB blocks in order
    copy_engine.register_host(dst.ctypes.data, nbytes)
    contiguous_layout = copy_engine.register_layout(np.array([[src.ctypes.data, big, 0, big]], dtype=np.int64),
                                                    nbytes // big, dst.ctypes.data, big, nbytes // big)
    in_order = np.arange(nbytes // big, dtype=np.int64)

    def contiguous() -> None:
        copy_engine.wait(copy_engine.submit("engine_to_host", contiguous_layout, in_order, in_order))

    def memcpy_two_threads() -> None:
        parts = [pool.submit(_core.memcpy, dst.ctypes.data + i * half, src.ctypes.data + i * half, half)
                 for i in range(2)]
        for p in parts:
            p.result()

    scattered("engine_to_host")  # warm up
    scattered("host_to_engine")
    memcpy_two_threads()
    contiguous()
    t = interleaved_best({
        "contiguous": contiguous,
        "memcpy1": lambda: _core.memcpy(dst.ctypes.data, src.ctypes.data, nbytes),
        "memcpy2": memcpy_two_threads,
        "e2h": lambda: scattered("engine_to_host"),
        "h2e": lambda: scattered("host_to_engine"),
    }, repeat)
    copy_engine.close()
    gbs = nbytes / 1e9
    return {k: gbs / v for k, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-mib", type=int, default=256, help="bytes moved per copy")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--chunks", default="4,16,32,128", help="chunk sizes in KiB")
    args = p.parse_args()
    total = args.total_mib << 20
    print(f"host_copy_bandwidth: {args.total_mib} MiB per copy, best of {args.repeat} interleaved rounds; "
          "ratio = scattered GB/s / contiguous memcpy GB/s on as many threads (same bytes, same run); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'chunk':>7} {'threads':>7} {'memcpy x1':>9} {'memcpy x2':>9} {'engine->host':>18} {'host->engine':>18} "
          f"{'contiguous':>10} {'e->h, h->e of it':>17}")
    with ThreadPoolExecutor(2) as pool:
        for chunk_kib in (int(c) for c in args.chunks.split(",")):
            for threads in (1, 2):
                r = run(chunk_kib << 10, total, threads, args.repeat, pool)
                ceiling = r["memcpy1"] if threads == 1 else r["memcpy2"]
                print(f"{chunk_kib:>5}Ki {threads:>7} {r['memcpy1']:>9.2f} {r['memcpy2']:>9.2f} "
                      f"{r['e2h']:>8.2f} ({100 * r['e2h'] / ceiling:>5.1f}%) "
                      f"{r['h2e']:>8.2f} ({100 * r['h2e'] / ceiling:>5.1f}%) {r['contiguous']:>10.2f} "
                      f"{100 * r['e2h'] / r['contiguous']:>7.1f}% {100 * r['h2e'] / r['contiguous']:>6.1f}%")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (a busy machine shows as 2 threads no faster than 1)")


if __name__ == "__main__":
    main()
