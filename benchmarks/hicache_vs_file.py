"""FlexKV as SGLang HiCache's storage backend vs SGLang's own HiCacheFile backend, through SGLang 0.5.23's classes.

One SGLang host pool (``MHATokenToKVPoolHost``, ``page_first``, CPU) and two ``HiCacheController``s over it:
one with ``--hicache-storage-backend file`` (``HiCacheFile``, SGLang's reference backend), one with the
dynamic backend ``flexkv.adapters.sglang.FlexKVHiCacheStorage`` (``interface_v1``). Every call goes through
the controller's own page functions, as its backup and prefetch threads call them: a put is
``page_set_func`` of one storage batch (128 pages, SGLang's STORAGE_BATCH_SIZE; HiCacheFile gets flat page
copies through ``batch_set``, FlexKV the host pool's pages through ``batch_set_v1``); a get is
``page_get_func`` of one batch into other host pages (``batch_get`` + copy into the pool, or
``batch_get_v1``). Both backends store the same pages (fresh SGLang page hashes every round) from the same
host pages and load them into the same host pages; HiCacheFile's directory and FlexKV's ``ssd_cache_dir``
are two folders of one directory (``--dir``, one disk). Rounds alternate which backend goes first; the
figure is the best round; throughput counts page bytes; ratio = FlexKV / HiCacheFile; ceilings, measured in the
same run: one single-threaded memcpy of a batch's bytes (memory rows), fio in the same directory (disk rows).
As in SGLang's scheduler on a GPU server, torch runs one intra-op thread, and the garbage collector is frozen
after setup (SGLang's ``freeze_gc``).

Rows (what each measures):

* ``cpu``: FlexKV with its CPU tier only. It holds two rounds, and two warm-up rounds (not counted) write
  every block once, so measured puts reuse evicted blocks whose pages are mapped, the steady state of a full
  tier. put / get of a round's pages, the get right after the put.
* ``ssd``: FlexKV with the SSD tier on (CPU tier and warm-up as above). *put (caller's time)* is what SGLang's backup
  thread waits for (FlexKV's SSD write-through runs in the background; HiCacheFile's files go to the page
  cache); *put until on disk* adds the wait until the round is on disk (FlexKV's ``flush``; for HiCacheFile a
  ``syncfs`` of its file system): the rate each sustains. *get (pages in CPU tier)* reads a round's pages back.
* ``ssd after restart``: both backends detached and attached again (SGLang's runtime restart of the storage
  backend): FlexKV's new control plane has an empty CPU tier and its SSD index rebuilt from disk, so every
  page comes from SSD (O_DIRECT; the counter of SSD reads is checked against the pages loaded).
  HiCacheFile reads its files through the page cache: *vs files in page cache* as it finds them (just written
  and synced), *both from disk* after each of its files was dropped from the page cache (``posix_fadvise
  DONTNEED``, checked with ``fincore`` where it exists).

Goals (SSD tier on): put >= 3x, get >= 10x HiCacheFile.

    python -P benchmarks/hicache_vs_file.py [--page-tokens 32] [--kv-heads 2] [--batches 8] [--rounds 3] \\
        [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

try:
    import torchvision  # noqa: F401
except ImportError:  # SGLang imports torchvision at module level; the tests' import-only stand-in serves
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "sglang_standin"))

import torch  # noqa: E402

LAYERS, HEAD_DIM = 8, 128  # bf16: a page is page_tokens x kv_heads x 4 KiB
BATCH = 128  # SGLang's STORAGE_BATCH_SIZE
WARMUP = 2  # rounds before the measured ones: FlexKV's CPU tier holds two rounds
sg = SimpleNamespace()  # SGLang's classes, imported once the page size is published


def import_sglang(page_tokens: int) -> None:
    """Publishes SGLang's server args (the page size) as its scheduler would, then imports its classes."""
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish

    publish(ServerArgs(model_path="dummy", page_size=page_tokens), role="scheduler")
    from sglang.srt.managers.cache_controller import HiCacheController, PrefetchOperation
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.utils import get_hash_str

    torch.set_num_threads(1)  # as SGLang's model runner sets it in the scheduler process on a GPU server
    sg.__dict__.update(HiCacheController=HiCacheController, PrefetchOperation=PrefetchOperation,
                       PagedTokenToKVPoolAllocator=PagedTokenToKVPoolAllocator,
                       HiCacheStorageExtraInfo=HiCacheStorageExtraInfo, MHATokenToKVPool=MHATokenToKVPool,
                       MHATokenToKVPoolHost=MHATokenToKVPoolHost, get_hash_str=get_hash_str)


LIBC = ctypes.CDLL(None, use_errno=True)
FLEXKV = {"backend_name": "flexkv", "module_path": "flexkv.adapters.sglang", "class_name": "FlexKVHiCacheStorage",
          "interface_v1": 1}
MODEL = "bench-model"


class Bench:
    def __init__(self, page_tokens: int, kv_heads: int, batches: int, rounds: int, workdir: Path) -> None:
        self.page, self.heads = page_tokens, kv_heads
        self.page_bytes = page_tokens * LAYERS * 2 * kv_heads * HEAD_DIM * 2
        self.batches, self.rounds, self.work = batches, rounds, workdir
        self.file_dir = workdir / "hicache-file"
        self.ssd_dir = workdir / "flexkv-ssd"
        dev = sg.MHATokenToKVPool(size=BATCH * self.page, page_size=self.page, dtype=torch.bfloat16,
                                  head_num=self.heads, head_dim=HEAD_DIM, layer_num=LAYERS, device="cpu",
                                  enable_memory_saver=False)
        self.alloc = sg.PagedTokenToKVPoolAllocator(size=dev.size, page_size=self.page, dtype=torch.bfloat16,
                                                    device="cpu", kvcache=dev, need_sort=False)
        self.host = sg.MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, host_to_device_ratio=2.5,
                                            host_size=0, page_size=self.page, layout="page_first", pin_memory=False,
                                            device="cpu", device_capacity_tokens=dev.size, start_layer=0,
                                            end_layer=LAYERS)
        self.host.kv_buffer.view(torch.uint8).copy_(torch.randint(0, 256, self.host.kv_buffer.view(torch.uint8).shape,
                                                                  dtype=torch.uint8))
        self.src = self.host.alloc(BATCH * self.page)
        self.dst = self.host.alloc(BATCH * self.page)
        self.seed = 0

    # ------------------------------------------------------------------------------------ setup

    def flexkv_config(self, ssd: bool) -> dict:
        cpu_blocks = 2 * self.batches * BATCH
        cache = {"tokens_per_block": self.page, "num_cpu_blocks": cpu_blocks, "enable_ssd": ssd}
        if ssd:
            cache.update(num_ssd_blocks=(self.rounds + WARMUP + 1) * self.batches * BATCH,
                         ssd_cache_dir=str(self.ssd_dir))
        path = self.work / f"flexkv-{'ssd' if ssd else 'cpu'}.json"
        path.write_text(json.dumps({"cache_config": cache}))
        return dict(FLEXKV, flexkv_config=str(path))

    def controller(self, backend: str, extra: dict) -> Any:
        return sg.HiCacheController(self.alloc, self.host, self.page, tp_group=None, load_cache_event=threading.Event(),
                                 io_backend="direct", storage_backend=backend, model_name=MODEL,
                                 storage_backend_extra_config=extra)

    @staticmethod
    def restart(ctrl: Any, backend: str, extra: dict) -> None:
        ctrl.detach_storage_backend()
        ctrl.attach_storage_backend(backend, model_name=MODEL, storage_backend_extra_config=extra)

    def keys(self) -> list[list[str]]:
        """A round's page hashes: `batches` fresh sequences of one storage batch each."""
        out = []
        for _ in range(self.batches):
            self.seed += 1
            g = torch.Generator().manual_seed(self.seed)
            tokens = torch.randint(10, 150_000, (BATCH * self.page,), generator=g).tolist()
            out.append(sg.get_hash_str(tokens, None, page_size=self.page))
        return out

    # ------------------------------------------------------------------------------------ calls

    def put(self, ctrl: Any, rnd: list[list[str]]) -> float:
        t0 = time.perf_counter()
        for keys in rnd:
            assert ctrl.page_set_func(keys, self.src, sg.HiCacheStorageExtraInfo(prefix_keys=None)), "put failed"
        return time.perf_counter() - t0

    def get(self, ctrl: Any, rnd: list[list[str]]) -> float:
        ops = [sg.PrefetchOperation(f"bench-{i}", []) for i in range(len(rnd))]
        t0 = time.perf_counter()
        for op, keys in zip(ops, rnd):
            got = ctrl.page_get_func(op, keys, self.dst)
            assert got == len(keys), f"get found {got} of {len(keys)} pages"
        return time.perf_counter() - t0

    def check_pages(self) -> None:
        """The last get delivered the source pages byte-exact."""
        for i in range(0, BATCH * self.page, self.page * 17):
            a = self.host.get_data_page(int(self.src[i]), flat=True).view(torch.uint8)
            b = self.host.get_data_page(int(self.dst[i]), flat=True).view(torch.uint8)
            assert torch.equal(a, b), "a loaded page differs from the stored one"

    def poison(self) -> None:
        bad = torch.full_like(self.host.get_data_page(0, flat=True), 0)
        bad.view(torch.uint8).fill_(0xA5)
        for i in self.dst.tolist()[::self.page]:
            self.host.set_from_flat_data_page(i, bad)

    def sync_files(self) -> None:
        """Writes HiCacheFile's dirty pages to disk: one syncfs of its file system (fdatasync per file without it)."""
        fd = os.open(self.file_dir, os.O_RDONLY)
        try:
            if getattr(LIBC, "syncfs", None) is not None and LIBC.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
        for path in self.file_dir.glob("*.bin"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

    def drop_file_cache(self, rnd: list[list[str]]) -> int:
        """Syncs the files of a round's pages and drops them from the page cache; returns the bytes still resident."""
        keys = {k for batch in rnd for k in batch}
        files = sorted(str(p) for p in self.file_dir.glob("*.bin") if p.name[:64] in keys)
        assert len(files) == len(keys), f"{len(files)} HiCacheFile files for {len(keys)} pages"
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return resident_bytes(files)

    # ------------------------------------------------------------------------------------ runs

    def run(self) -> dict[str, dict[str, float]]:
        file_extra = {"file_storage_path": str(self.file_dir)}
        rows: dict[str, dict[str, list[float]]] = {}
        file_ctrl = self.controller("file", file_extra)
        for ssd in (False, True):
            fx_extra = self.flexkv_config(ssd)
            fx_ctrl = self.controller("dynamic", fx_extra)
            backend = fx_ctrl.storage_backend
            assert type(backend).__name__ == "FlexKVHiCacheStorage" and backend.store.cache_config.enable_ssd == ssd
            times: dict[str, list[float]] = defaultdict(list)
            rounds = []
            for r in range(-WARMUP, self.rounds):  # warm-up rounds write every CPU block once; not counted
                if r == 0:
                    times.clear()
                    written0 = backend.flexkv_stats()["ssd_writes"]
                rnd_file, rnd_fx = self.keys(), self.keys()
                order = (("file", file_ctrl, rnd_file), ("fx", fx_ctrl, rnd_fx))
                for name, ctrl, rnd in order if r % 2 == 0 else order[::-1]:
                    times[f"{name}_put"].append(t := self.put(ctrl, rnd))
                    if ssd:  # then until the round is on disk: FlexKV's write-through, HiCacheFile's dirty pages
                        t0 = time.perf_counter()
                        if name == "fx":
                            assert backend.store.flush(600), "write-through did not finish"
                        else:
                            self.sync_files()
                        times[f"{name}_flush"].append(t + time.perf_counter() - t0)
                for name, ctrl, rnd in order if r % 2 == 0 else order[::-1]:
                    self.poison()
                    times[f"{name}_get"].append(self.get(ctrl, rnd))
                    self.check_pages()
                if r >= 0:
                    rounds.append((rnd_file, rnd_fx))
            rows["ssd" if ssd else "cpu"] = times
            if not ssd:
                fx_ctrl.detach_storage_backend()
                file_ctrl.storage_backend.clear()  # its dirty files go before the SSD rows share the disk
                continue
            pages = self.rounds * self.batches * BATCH
            written = backend.flexkv_stats()["ssd_writes"] - written0
            assert written == pages, f"{written} of {pages} pages reached SSD"
            # Restart both backends; every round's pages are read back from SSD / from HiCacheFile's files.
            self.restart(fx_ctrl, "dynamic", fx_extra)
            self.restart(file_ctrl, "file", file_extra)
            restored = fx_ctrl.storage_backend.store.ssd_restored
            assert restored >= pages, f"FlexKV restored {restored} pages from SSD, expected {pages}"
            cold: dict[str, list[float]] = defaultdict(list)
            resident = []
            for r, (rnd_file, rnd_fx) in enumerate(rounds):
                reads0 = fx_ctrl.storage_backend.flexkv_stats()["ssd_reads"]
                self.poison()
                cold["fx_get"].append(self.get(fx_ctrl, rnd_fx))
                self.check_pages()
                reads = fx_ctrl.storage_backend.flexkv_stats()["ssd_reads"] - reads0
                assert reads == self.batches * BATCH, f"round {r}: {reads} pages came from SSD, not all"
                self.poison()
                cold["file_get_cached"].append(self.get(file_ctrl, rnd_file))
                self.check_pages()
                resident.append(self.drop_file_cache(rnd_file))
                self.poison()
                cold["file_get_disk"].append(self.get(file_ctrl, rnd_file))
                self.check_pages()
            cold["resident_after_drop"] = [max(resident)]
            rows["restart"] = cold
            fx_ctrl.detach_storage_backend()
        file_ctrl.detach_storage_backend()
        return rows


def resident_bytes(files: list[str]) -> int:
    """Bytes of the files in the page cache (fincore), or -1 where fincore is missing."""
    if not files or shutil.which("fincore") is None:
        return -1
    total = 0
    for i in range(0, len(files), 256):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *files[i:i + 256]],
                             capture_output=True, text=True, check=True).stdout
        total += sum(int(x) for x in out.split())
    return total


def memcpy_rate(nbytes: int, repeat: int = 8) -> float:
    """Bytes/s of one single-threaded contiguous memcpy of a storage batch's bytes (best of `repeat`)."""
    from flexkv import _core

    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.ones(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _core.memcpy(dst.data_ptr(), src.data_ptr(), nbytes)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def fio(directory: Path, block: int, total: int, rw: str) -> float:
    """The disk's rate (bytes/s) for O_DIRECT random I/O of one page per request, 64 in flight (io_uring)."""
    cmd = ["fio", "--name=disk-ceiling", f"--filename={directory / 'fio.dat'}", f"--size={total}", f"--bs={block}",
           f"--rw={rw}", "--direct=1", "--ioengine=io_uring", "--iodepth=64", "--numjobs=1", "--randrepeat=0",
           "--output-format=json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return float(out["jobs"][0]["write" if "write" in rw else "read"]["bw_bytes"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page-tokens", type=int, default=32, help="SGLang's page size (FlexKV's tokens_per_block)")
    p.add_argument("--kv-heads", type=int, default=2, help="a page is page_tokens x kv_heads x 4 KiB")
    p.add_argument("--batches", type=int, default=8, help="storage batches of 128 pages per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/var/tmp", help="one directory on the disk under test, for both backends")
    args = p.parse_args()
    import_sglang(args.page_tokens)
    work = Path(tempfile.mkdtemp(prefix="flexkv-hicache-bench-", dir=args.dir))
    load0 = os.getloadavg()[0]
    try:
        bench = Bench(args.page_tokens, args.kv_heads, args.batches, args.rounds, work)
        gc.freeze()  # as SGLang's freeze_gc: full collections of the imported modules' objects stay out of the timing
        try:
            rows = bench.run()
        finally:
            gc.unfreeze()  # modules are torn down as usual at exit
        total = args.batches * BATCH * bench.page_bytes
        disk = {rw: fio(work, bench.page_bytes, total, rw) for rw in ("randwrite", "randread")} \
            if shutil.which("fio") else {}
        disk["memcpy"] = memcpy_rate(bench.page_bytes * BATCH)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = total / 1e9
    print(f"hicache_vs_file: SGLang HiCacheController, page_first host pool, pages of {bench.page_bytes >> 10} KiB "
          f"({args.page_tokens} tokens), {args.batches} batches of {BATCH} pages ({gb * 1e3:.0f} MB) per round, best "
          f"of {args.rounds} rounds; dir {args.dir}; load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'FlexKV tier':<18} {'operation':<27} {'HiCacheFile GB/s':>16} {'FlexKV GB/s':>12} {'ratio':>7} "
          f"{'vs ceiling':>10} {'noise H/F':>10}")

    def line(tier: str, op: str, file_s: list[float], fx_s: list[float], ceiling: str = "memcpy") -> None:
        f, x = min(file_s), min(fx_s)
        vs_disk = f"{total / x / disk[ceiling]:>9.0%}" if ceiling in disk else ""
        noise = f"{statistics.median(file_s) / f:.2f}/{statistics.median(fx_s) / x:.2f}"
        print(f"{tier:<18} {op:<27} {gb / f:>16.2f} {gb / x:>12.2f} {f / x:>6.2f}x {vs_disk:>10} {noise:>10}")

    c, s, r = rows["cpu"], rows["ssd"], rows["restart"]
    line("CPU", "put", c["file_put"], c["fx_put"])
    line("CPU", "get", c["file_get"], c["fx_get"])
    line("CPU + SSD", "put (caller's time)", s["file_put"], s["fx_put"])
    line("CPU + SSD", "put until on disk", s["file_flush"], s["fx_flush"], "randwrite")
    line("CPU + SSD", "get (pages in CPU tier)", s["file_get"], s["fx_get"])
    line("SSD after restart", "get vs files in page cache", r["file_get_cached"], r["fx_get"], "randread")
    line("SSD after restart", "get, both from disk", r["file_get_disk"], r["fx_get"], "randread")
    resident = int(r["resident_after_drop"][0])
    print(f"ceilings: memcpy {disk['memcpy'] / 1e9:.2f} GB/s (one thread); disk (fio, O_DIRECT, one page per "
          "request, 64 in flight, same directory): "
          + (f"write {disk['randwrite'] / 1e9:.2f} GB/s, read {disk['randread'] / 1e9:.2f} GB/s" if "randread" in disk
             else "not measured (no fio)")
          + "; HiCacheFile bytes in the page cache after the drop: "
          + ("unknown (no fincore)" if resident < 0 else str(resident)))
    print("ratio: FlexKV GB/s / HiCacheFile GB/s, best rounds (goals with the SSD tier on: put >= 3x, get >= 10x); "
          "vs ceiling: FlexKV's rate over one single-threaded memcpy of the same bytes (CPU rows) or fio's (disk "
          "rows); noise: median / best round, HiCacheFile/FlexKV")


if __name__ == "__main__":
    main()
