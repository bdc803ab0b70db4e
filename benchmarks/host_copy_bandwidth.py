"""Host copy engine bandwidth for scattered blocks vs one contiguous memcpy of the same bytes.

The engine side is a vLLM-like per-layer layout (K and V of every layer in their
own arrays, so a block is 2 * layers chunks in different places); block ids on
both sides are random permutations. The ceiling is one plain memcpy of the same
number of bytes between two contiguous buffers, measured in the same run.

    python benchmarks/host_copy_bandwidth.py [--total-mib 256] [--repeat 5]
"""

from __future__ import annotations

import argparse

import numpy as np

from flexkv import _core

from timing import best_of


def run(chunk: int, total: int, threads: int, repeat: int, layers: int = 4) -> dict[str, float]:
    segs_per_block = 2 * layers
    block_bytes = chunk * segs_per_block
    n_blocks = total // block_bytes
    rng = np.random.default_rng(chunk + threads)
    engine = [np.ones(n_blocks * chunk, dtype=np.uint8) for _ in range(segs_per_block)]  # touched pages
    host = np.ones(n_blocks * block_bytes, dtype=np.uint8)
    segments = np.array([[e.ctypes.data, chunk, s * chunk, chunk] for s, e in enumerate(engine)], dtype=np.int64)
    e_ids = rng.permutation(n_blocks).astype(np.int64)
    h_ids = rng.permutation(n_blocks).astype(np.int64)
    copy_engine = _core.HostCopyEngine(threads)
    nbytes = n_blocks * block_bytes

    def scattered(direction: str) -> None:
        copy_engine.copy(direction, segments, n_blocks, host.ctypes.data, block_bytes, n_blocks, e_ids, h_ids)

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    scattered("engine_to_host")  # warm up
    t_memcpy = best_of(lambda: _core.memcpy(dst.ctypes.data, src.ctypes.data, nbytes), repeat)
    t_d2h = best_of(lambda: scattered("engine_to_host"), repeat)
    t_h2d = best_of(lambda: scattered("host_to_engine"), repeat)
    gbs = nbytes / 1e9
    return {"memcpy": gbs / t_memcpy, "e2h": gbs / t_d2h, "h2e": gbs / t_h2d}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-mib", type=int, default=256, help="bytes moved per copy")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    total = args.total_mib << 20
    print(f"host_copy_bandwidth: {args.total_mib} MiB per copy, best of {args.repeat}; "
          "ratio = scattered GB/s / contiguous memcpy GB/s (same bytes, same run)")
    print(f"{'chunk':>7} {'threads':>7} {'memcpy GB/s':>11} {'engine->host':>18} {'host->engine':>18}")
    for chunk_kib in (4, 16, 32, 128):
        for threads in (1, 2):
            r = run(chunk_kib << 10, total, threads, args.repeat)
            print(f"{chunk_kib:>5}Ki {threads:>7} {r['memcpy']:>11.2f} "
                  f"{r['e2h']:>8.2f} ({100 * r['e2h'] / r['memcpy']:>5.1f}%) "
                  f"{r['h2e']:>8.2f} ({100 * r['h2e'] / r['memcpy']:>5.1f}%)")


if __name__ == "__main__":
    main()
