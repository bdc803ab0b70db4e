"""SSD tier bandwidth against fio on the same directory, measured in the same run.

For each block size, FlexKV's SsdStore writes and then reads every slot of a
store in random order (header + payload per slot, O_DIRECT, the configured queue
depth); fio does random writes and reads of the same slot size with O_DIRECT and
io_uring at the same queue depth on a file of the same size in the same
directory. After one warm-up pass each, the two alternate for --rounds rounds and
the best round of each counts. Both count every byte that reaches the disk (FlexKV's slots carry a
4 KiB header; the payload-only figure is printed too).

    python benchmarks/ssd_bandwidth.py --dir /path/on/nvme [--total-mib 1024] [--queue-depth 64]

Needs fio (Debian: apt-get install fio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from flexkv import _core

TOKENS_PER_BLOCK = 16


def aligned(nbytes: int, align: int = 4096) -> np.ndarray:
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    buf = raw[off:off + nbytes]
    buf[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    return buf


class FlexKVRun:
    """One SsdStore with n random-slot blocks; write() and read() time one pass over them."""

    def __init__(self, directory: str, block_bytes: int, n_blocks: int, queue_depth: int, engine: str,
                 batch: int) -> None:
        self.store = _core.SsdStore([directory], n_blocks, block_bytes, TOKENS_PER_BLOCK, f"bench-{block_bytes}",
                                    io_engine=engine, queue_depth=queue_depth)
        padded = -(-block_bytes // 4096) * 4096
        self.buf = aligned(batch * padded)
        rng = np.random.default_rng(1)
        self.n, self.batch, self.block_bytes = n_blocks, batch, block_bytes
        self.slots = rng.permutation(n_blocks).astype(np.int32)
        self.keys = rng.integers(0, 2**63, (n_blocks, 2), dtype=np.int64).astype(np.uint64)
        self.parents = rng.integers(0, 2**63, (n_blocks, 2), dtype=np.int64).astype(np.uint64)
        self.positions = np.arange(n_blocks, dtype=np.int64)
        self.tokens = rng.integers(0, 32000, (n_blocks, TOKENS_PER_BLOCK), dtype=np.int64)
        self.addrs = np.uint64(self.buf.ctypes.data) + np.arange(batch, dtype=np.uint64) * np.uint64(padded)

    def _sweep(self, op) -> float:
        """Bytes per second over every slot."""
        t0 = time.perf_counter()
        for i in range(0, self.n, self.batch):
            j = min(self.n, i + self.batch)
            status = op(self.slots[i:j], self.keys[i:j], self.parents[i:j], self.positions[i:j], self.tokens[i:j],
                        self.addrs[: j - i])
            if (status != 0).any():
                raise RuntimeError(f"{int((status != 0).sum())} block(s) failed")
        return self.n * self.store.slot_bytes / (time.perf_counter() - t0)

    def write(self) -> float:
        return self._sweep(self.store.write)

    def read(self) -> float:
        return self._sweep(self.store.read)


def fio_run(path: str, slot: int, n_blocks: int, queue_depth: int, rw: str) -> float:
    cmd = ["fio", "--name=flexkv-peer", f"--filename={path}", f"--size={slot * n_blocks}", f"--bs={slot}",
           f"--rw={rw}", "--direct=1", "--ioengine=io_uring", f"--iodepth={queue_depth}", "--numjobs=1",
           "--randrepeat=0", "--output-format=json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    job = out["jobs"][0]
    return float(job["write" if "write" in rw else "read"]["bw_bytes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a new one in /var/tmp)")
    p.add_argument("--total-mib", type=int, default=1024, help="bytes per run, per block size")
    p.add_argument("--queue-depth", type=int, default=64)
    p.add_argument("--batch", type=int, default=256, help="blocks per FlexKV call")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engine", default="io_uring", choices=["io_uring", "threads"])
    args = p.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("ssd_bandwidth: fio is needed as the peer (Debian: apt-get install fio)")
    base = args.dir or tempfile.mkdtemp(prefix="flexkv-ssd-bench-", dir="/var/tmp")
    print(f"ssd_bandwidth: {args.total_mib} MiB per run in {base}, queue depth {args.queue_depth}; ratio = FlexKV "
          "GB/s / fio GB/s, same slot size, same directory, same run")
    print(f"{'block':>8} {'slot':>9} {'write GB/s':>11} {'fio':>6} {'ratio':>7} {'read GB/s':>10} {'fio':>6} "
          f"{'ratio':>7} {'payload w/r GB/s':>17}")
    try:
        for kib in (256, 1024, 4096):
            block = kib << 10
            run_dir = tempfile.mkdtemp(dir=base)
            n = max(16, (args.total_mib << 20) // (block + 4096))
            flexkv = FlexKVRun(run_dir, block, n, args.queue_depth, args.engine, args.batch)
            slot = flexkv.store.slot_bytes
            fio_file = os.path.join(run_dir, "fio.dat")
            # Warm-up: both files fully written once (fresh extents are slower to write), then rounds that
            # alternate the two so drift in the disk affects both; the best round of each counts.
            flexkv.write()
            fio_run(fio_file, slot, n, args.queue_depth, "write")
            best = {"w": 0.0, "r": 0.0, "fw": 0.0, "fr": 0.0}
            for _ in range(args.rounds):
                best["fw"] = max(best["fw"], fio_run(fio_file, slot, n, args.queue_depth, "randwrite"))
                best["w"] = max(best["w"], flexkv.write())
                best["fr"] = max(best["fr"], fio_run(fio_file, slot, n, args.queue_depth, "randread"))
                best["r"] = max(best["r"], flexkv.read())
            payload = block / slot
            print(f"{kib:>5}Ki {slot:>9} {best['w'] / 1e9:>11.2f} {best['fw'] / 1e9:>6.2f} "
                  f"{100 * best['w'] / best['fw']:>6.1f}% {best['r'] / 1e9:>10.2f} {best['fr'] / 1e9:>6.2f} "
                  f"{100 * best['r'] / best['fr']:>6.1f}% {payload * best['w'] / 1e9:>8.2f} / "
                  f"{payload * best['r'] / 1e9:.2f}")
            del flexkv
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
