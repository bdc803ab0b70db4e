"""GPU data plane bandwidth: scattered KV blocks between GPU and pinned host memory, as ratios to one contiguous
cudaMemcpyAsync of the same bytes measured in the same run.

Engine side: a Qwen-32B-shaped vLLM layout (64 layers, per layer [2, num_blocks, tokens_per_block, 8 heads,
128], bf16), so a block is 128 chunks of tokens_per_block * 2 KiB in 128 places; tokens_per_block sets the chunk
size. Host side: anonymous memory registered with cudaHostRegister, as the CPU tier is. Engine and host block
ids are random permutations. Rows:

  contiguous      one cudaMemcpyAsync of all the bytes (the ceiling every ratio divides by)
  per-chunk       one cudaMemcpyAsync per chunk (what a naive block copy does)
  kernel/N        FlexKV's copy kernel on N thread blocks (transfer_sms_*)
  staged/N        whole host blocks by DMA through 4 device slots of 8 MiB, scattered (gathered) there by the
                  copy kernel on N thread blocks: the default path
  copy_engine     cudaMemcpyBatchAsync, no SMs (use_ce_transfer_*)
  kernel+ce       the kernel for host to GPU and the copy engine for GPU to host (ce+kernel: the reverse)

Each is timed host to GPU, GPU to host, and both at once (two streams, each direction moving the same bytes).
Then the time to load a 1K-token prefix (64 blocks of 16 tokens, 256 MiB) is printed next to the contiguous
copy of the same bytes. Needs a CUDA build of FlexKV and an NVIDIA GPU.

    python benchmarks/gpu_transfer.py [--total-mib 1024] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import subprocess
import time

import numpy as np
import torch

from flexkv import _core
from flexkv.core.layout import EngineLayout, KVCacheLayout, KVCacheLayoutType

LAYERS, HEADS, HEAD = 64, 8, 128
ELEM = 2  # bf16
TOKEN_BYTES = HEADS * HEAD * ELEM  # one token of one layer's K: 2 KiB


class Rig:
    """GPU and host buffers of 2 * total bytes, random, the host one registered once for all engines."""

    def __init__(self, total: int) -> None:
        self.size = 2 * total
        self.gpu = torch.randint(0, 256, (self.size,), dtype=torch.uint8, device="cuda")
        self.host_map = mmap.mmap(-1, self.size)
        self.host = np.frombuffer(self.host_map, dtype=np.uint8)
        self.host[:] = np.random.default_rng(0).integers(0, 256, size=self.size, dtype=np.uint8)
        self.host_base = self.host.ctypes.data
        # Registered here, so the engines find it registered, use it and leave it registered.
        portable_mapped = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped, as GpuCopyEngine registers
        err = torch.cuda.cudart().cudaHostRegister(self.host_base, self.size, portable_mapped)
        assert int(err) == 0, f"cudaHostRegister failed: {err}"

    def engine(self, path: str, sms: int = 8, path_d2h: str | None = None, slot_mib: int = 8) -> _core.GpuCopyEngine:
        e = _core.GpuCopyEngine(torch.cuda.current_device(), path, path_d2h or path, sms, sms, slot_mib << 20)
        e.register_host(self.host_base, self.size)
        return e


class Job:
    """One copy: a direction, a layout over a host region, and block lists."""

    def __init__(self, direction: str, segments: np.ndarray, engine_blocks: int, host_base: int, host_block: int,
                 host_blocks: int, e_ids: np.ndarray, h_ids: np.ndarray) -> None:
        self.direction = direction
        self.layout = (segments, engine_blocks, host_base, host_block, host_blocks)
        self.e_ids, self.h_ids = e_ids.astype(np.int64), h_ids.astype(np.int64)

    def register(self, engine: _core.GpuCopyEngine) -> int:
        """The job's layout id in `engine` (registration is not part of any timing)."""
        return engine.register_layout(*self.layout)

    def submit(self, engine: _core.GpuCopyEngine, layout_id: int) -> int:
        return engine.submit(self.direction, layout_id, self.e_ids, self.h_ids, self.direction == "host_to_engine")


def timed(engine: _core.GpuCopyEngine, jobs: list[Job], repeat: int) -> float:
    """Seconds from submitting the jobs (at once) to the end of the last: the best of `repeat` runs, the one
    least disturbed by the rest of the machine (the same rule for the ceiling and for every path)."""
    layout_ids = [job.register(engine) for job in jobs]
    for job, layout_id in zip(jobs, layout_ids):  # warm-up: first-touch of the staging buffers and the device pool
        engine.wait(job.submit(engine, layout_id), -1)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ids = [job.submit(engine, layout_id) for job, layout_id in zip(jobs, layout_ids)]
        for i in ids:
            engine.wait(i, -1)  # raises if the job failed
        times.append(time.perf_counter() - t0)
    for layout_id in layout_ids:
        engine.unregister_layout(layout_id)
    return min(times)


def scattered_jobs(rig: Rig, chunk: int, n: int, seed: int) -> dict[str, Job]:
    """H2D and D2H jobs of n scattered blocks each, on disjoint halves of the buffers."""
    tpb = chunk // TOKEN_BYTES
    block_bytes = LAYERS * 2 * chunk
    nb = 2 * n
    per_layer = 2 * nb * chunk
    layers = [rig.gpu[i * per_layer:(i + 1) * per_layer].view(torch.bfloat16).view(2, nb, tpb, HEADS, HEAD)
              for i in range(LAYERS)]
    layout = EngineLayout.from_kv_layout(layers, KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, nb, tpb,
                                                               HEADS, HEAD))
    segs = layout.grouped_segments()
    rng = np.random.default_rng(seed)
    e = rng.permutation(nb)
    h = rng.permutation(nb)
    return {
        "h2d": Job("host_to_engine", segs, nb, rig.host_base, block_bytes, nb, e[:n], h[:n]),
        "d2h": Job("engine_to_host", segs, nb, rig.host_base, block_bytes, nb, e[n:], h[n:]),
    }


def contiguous_jobs(rig: Rig, nbytes: int) -> dict[str, Job]:
    """One segment of nbytes: each job is a single cudaMemcpyAsync (memcpy_per_chunk path, one chunk)."""
    gpu = rig.gpu.data_ptr()
    one = np.array([0], dtype=np.int64)
    return {
        "h2d": Job("host_to_engine", np.array([[gpu, nbytes, 0, nbytes, 0]], np.int64), 2, rig.host_base, nbytes, 2,
                   one, one),
        "d2h": Job("engine_to_host", np.array([[gpu, nbytes, 0, nbytes, 0]], np.int64), 2, rig.host_base, nbytes, 2,
                   one + 1, one + 1),
    }


def measure(rig: Rig, engine: _core.GpuCopyEngine, jobs: dict[str, Job], nbytes: int, repeat: int) -> dict:
    out = {}
    for name, group in (("h2d", [jobs["h2d"]]), ("d2h", [jobs["d2h"]]), ("both", [jobs["h2d"], jobs["d2h"]])):
        out[name] = len(group) * nbytes / timed(engine, group, repeat) / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total-mib", type=int, default=1024, help="bytes each direction moves per copy")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--chunks", default="4,16,32,128", help="chunk sizes in KiB")
    p.add_argument("--sms", default="4,8,16", help="thread blocks of the kernel path")
    p.add_argument("--paths", default="per-chunk,kernel,staged,copy_engine,mixed", help="rows besides contiguous")
    p.add_argument("--slot-mib", default="8", help="device slot sizes of the staged path, in MiB")
    p.add_argument("--no-prefix", action="store_true", help="skip the 1K-token prefix timing")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if not (_core.CUDA_BUILT and torch.cuda.is_available()):
        raise SystemExit("gpu_transfer needs a CUDA build of FlexKV and a CUDA device")
    total = args.total_mib << 20
    rig = Rig(total)
    name = torch.cuda.get_device_name()
    try:
        link = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.width.current",
                               "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        link = "?"
    print(f"gpu_transfer: {name} (PCIe gen, width: {link}); Qwen-32B shape, {args.total_mib} MiB per direction, "
          f"best of {args.repeat}; ratio = GB/s / contiguous cudaMemcpyAsync GB/s of the same direction(s)")
    results: dict = {"device": name, "pcie": link, "total_mib": args.total_mib, "rows": []}
    print(f"{'chunk':>6} {'path':>12} {'H2D GB/s':>9} {'ratio':>6} {'D2H GB/s':>9} {'ratio':>6} "
          f"{'both GB/s':>10} {'ratio':>6}")
    for chunk_kib in (int(c) for c in args.chunks.split(",")):
        chunk = chunk_kib << 10
        n = total // (LAYERS * 2 * chunk)
        nbytes = n * LAYERS * 2 * chunk
        jobs = scattered_jobs(rig, chunk, n, chunk_kib)
        baseline = rig.engine("memcpy_per_chunk")
        ceiling = measure(rig, baseline, contiguous_jobs(rig, nbytes), nbytes, args.repeat)
        paths = args.paths.split(",")
        rows = [("contiguous", ceiling)]
        if "per-chunk" in paths:
            rows.append(("per-chunk", measure(rig, baseline, jobs, nbytes, max(1, args.repeat // 3))))
        del baseline
        if "kernel" in paths:
            for sms in (int(s) for s in args.sms.split(",")):
                rows.append((f"kernel/{sms}", measure(rig, rig.engine("kernel", sms), jobs, nbytes, args.repeat)))
        if "staged" in paths:  # whole-block DMA through device slots, scattered by the kernel on `sms` blocks
            slots = [int(m) for m in args.slot_mib.split(",")]
            for sms in (int(s) for s in args.sms.split(",") if int(s) <= 8):
                for mib in slots:
                    name = f"staged/{sms}" + (f"@{mib}M" if len(slots) > 1 else "")
                    rows.append((name, measure(rig, rig.engine("staged", sms, slot_mib=mib), jobs, nbytes,
                                               args.repeat)))
        if "copy_engine" in paths:
            rows.append(("copy_engine", measure(rig, rig.engine("copy_engine"), jobs, nbytes, args.repeat)))
        if "mixed" in paths:  # H2D by one path, D2H by the other
            rows.append(("kernel+ce", measure(rig, rig.engine("kernel", 8, "copy_engine"), jobs, nbytes,
                                              args.repeat)))
            rows.append(("ce+kernel", measure(rig, rig.engine("copy_engine", 8, "kernel"), jobs, nbytes,
                                              args.repeat)))
        for path, r in rows:
            ratio = {k: r[k] / ceiling[k] for k in r}
            print(f"{chunk_kib:>4}Ki {path:>12} {r['h2d']:>9.2f} {ratio['h2d']:>6.1%} {r['d2h']:>9.2f} "
                  f"{ratio['d2h']:>6.1%} {r['both']:>10.2f} {ratio['both']:>6.1%}")
            results["rows"].append({"chunk_kib": chunk_kib, "path": path, **{f"{k}_gbs": v for k, v in r.items()},
                                    **{f"{k}_ratio": v for k, v in ratio.items()}})

    if not args.no_prefix:
        # A 1K-token prefix of the Qwen-32B shape: 64 blocks of 16 tokens, 128 chunks of 32 KiB each.
        n, chunk = 64, 16 * TOKEN_BYTES
        nbytes = n * LAYERS * 2 * chunk
        jobs = scattered_jobs(rig, chunk, n, 1)
        reps = max(20, args.repeat)
        prefix = {"contiguous": timed(rig.engine("memcpy_per_chunk"), [contiguous_jobs(rig, nbytes)["h2d"]], reps)}
        for path in ("kernel", "staged", "copy_engine"):
            prefix[path] = timed(rig.engine(path), [jobs["h2d"]], reps)
        print(f"1K-token prefix load ({nbytes >> 20} MiB): " + ", ".join(
            f"{k} {v * 1e3:.2f} ms" for k, v in prefix.items()) + " (kernel and staged on 8 thread blocks)")
        results["prefix_1k_ms"] = {k: v * 1e3 for k, v in prefix.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
