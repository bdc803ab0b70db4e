"""``flexkv bench``: replays a multi-turn chat workload through KVManager against several
cache configurations and prints the manual's table (hit rate, transfer latency, throughput)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .chat_workload import ChatWorkloadSpec, chat_requests
from .config import MODEL_PRESETS, CacheConfig, ModelConfig, format_bytes
from .config_file import load_config
from .errors import FlexKVError
from .kv_manager import KVManager
from .layout import EngineLayout
from .server_launch import ServerSettings

# The manual's configurations (chapter 17.3), sized in GiB as the manual does: a small CPU tier with 16-token
# blocks, a large one with 32-token blocks, and the small CPU tier backed by an SSD tier (the manual's CPU + SSD
# deployment, 17.1) in --ssd-dir or a scratch directory.
DEFAULT_CONFIGS: list[tuple[str, CacheConfig]] = [
    ("1 small", CacheConfig(cpu_cache_gb=0.5, tokens_per_block=16)),
    ("2 large", CacheConfig(cpu_cache_gb=2.0, tokens_per_block=32)),
    ("3 small+ssd", CacheConfig(cpu_cache_gb=0.5, tokens_per_block=16, enable_ssd=True, ssd_cache_gb=4.0,
                                ssd_cache_dir="<--ssd-dir>")),
]

# A 0.5B-class model's KV shape (Qwen2.5-0.5B: 24 layers, 2 KV heads of 64, bfloat16; 12 KiB per token): real
# bytes to move, and the default configurations fit a small machine.
DEFAULT_MODEL = "qwen-0.5b"
PERCENTILES = (5, 25, 50, 75, 95, 99)


@dataclass
class BenchResult:
    name: str
    num_cpu_blocks: int
    tokens_per_block: int
    capacity_tokens: int
    capacity_bytes: int
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_rate: float
    ssd_hit_tokens: int
    num_ssd_blocks: int
    transfer_p50_ms: float
    transfer_p99_ms: float
    requests_per_s: float
    evicted_blocks: int
    load_ms: dict[str, float] = field(default_factory=dict)  # p5 .. p99 of the per-request load latency
    sweep: bool = False  # a --capacities point
    cpu_ms_per_request: float = 0.0  # CPU time of the whole process (every thread) per request


def run_config(name: str, cache_config: CacheConfig, model: ModelConfig, spec: ChatWorkloadSpec,
               progress: object | None = None, settings: ServerSettings | None = None,
               sweep: bool = False) -> BenchResult:
    """Replays the workload: for each request a get (load what is cached) then a put (store the rest). With
    an SSD tier each put waits for its write-through, so the hit rate does not depend on the disk's timing.
    ``settings`` (metrics_port, log interval) default to none of either."""
    cache_config = cache_config.resolved(model)
    tpb = cache_config.tokens_per_block
    max_tokens = spec.system_prompt_tokens + spec.turns * (spec.user_tokens[1] + spec.answer_tokens[1])
    engine_blocks = max_tokens // tpb + 1
    block_bytes = model.block_bytes(tpb)
    # The engine's paged KV memory: one request at a time, token i of the prompt in slot i.
    engine = np.random.default_rng(1).integers(0, 255, size=(engine_blocks, block_bytes), dtype=np.uint8)
    latencies: list[float] = []
    requests = 0
    prompt_tokens = 0
    ssd = cache_config.enable_ssd
    with KVManager(model, cache_config, server_settings=settings or ServerSettings(num_log_interval_requests=0)) as kv:
        kv.register_kv_caches(EngineLayout.from_block_views([engine]))
        start, cpu_start = time.perf_counter(), time.process_time()
        for req in chat_requests(spec):
            tokens = req.token_ids
            task_id, mask = kv.get_match(tokens)
            t0 = time.perf_counter()
            kv.launch(task_id, np.flatnonzero(mask))
            response = kv.wait(task_id)[task_id]
            if mask.any():
                latencies.append(time.perf_counter() - t0)
            if not response.ok:
                raise FlexKVError(f"bench: get task {task_id} ended {response.status.value}: {response.error}")
            put_id, put_mask = kv.put_match(np.concatenate([tokens, req.answer_ids]))
            kv.launch(put_id, np.flatnonzero(put_mask))
            kv.wait(put_id, completely=ssd)
            requests += 1
            prompt_tokens += len(tokens)
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        stats = kv.cache_stats()
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    n_cpu = cache_config.num_cpu_blocks
    return BenchResult(
        name=name, num_cpu_blocks=n_cpu, tokens_per_block=tpb, capacity_tokens=n_cpu * tpb,
        capacity_bytes=n_cpu * block_bytes, requests=requests, prompt_tokens=prompt_tokens,
        hit_tokens=stats["get_hit_tokens"], hit_rate=stats["get_hit_tokens"] / prompt_tokens if prompt_tokens else 0.0,
        ssd_hit_tokens=stats["ssd_hit_tokens"], num_ssd_blocks=cache_config.num_ssd_blocks if ssd else 0,
        transfer_p50_ms=float(np.percentile(lat, 50)), transfer_p99_ms=float(np.percentile(lat, 99)),
        requests_per_s=requests / elapsed if elapsed > 0 else 0.0, evicted_blocks=stats["cpu"]["evicted"],
        load_ms={f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(lat, PERCENTILES))}, sweep=sweep,
        cpu_ms_per_request=1e3 * cpu_s / requests if requests else 0.0)


def format_table(results: list[BenchResult]) -> str:
    head = ("config", "capacity", "block size", "hit rate", "of which SSD", "transfer p50/p99", "throughput")
    rows = [head]
    for r in results:
        capacity = f"{r.num_cpu_blocks} blocks ({format_bytes(r.capacity_bytes)})"
        if r.num_ssd_blocks:
            capacity += f" + SSD {r.num_ssd_blocks} blocks"
        ssd = f"{100 * r.ssd_hit_tokens / r.prompt_tokens:.1f}%" if r.num_ssd_blocks and r.prompt_tokens else "-"
        rows.append((r.name, capacity, str(r.tokens_per_block), f"{100 * r.hit_rate:.1f}%", ssd,
                     f"{r.transfer_p50_ms:.2f} / {r.transfer_p99_ms:.2f} ms", f"{r.requests_per_s:.0f} req/s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a FlexKV config file to bench (repeatable); default: the manual's configurations. An SSD "
                        "tier runs in a scratch directory (or --ssd-dir), never the config's own")
    p.add_argument("--capacities", default="", metavar="C,C,...",
                   help="CPU capacities to sweep, in blocks (500) or GiB (0.5GB), at each block size of the "
                        "configs: the hit rate against capacity plot")
    p.add_argument("--ssd-dir", default=None, metavar="DIR",
                   help="an empty directory for the SSD tiers (on a disk with O_DIRECT; default: a new directory "
                        "under /var/tmp, removed afterwards)")
    p.add_argument("--no-ssd", action="store_true", help="skip the default CPU + SSD configuration")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODEL_PRESETS),
                   help=f"the KV shape of a real model (default {DEFAULT_MODEL}: 12 KiB per token)")
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--turns", type=int, default=ChatWorkloadSpec.turns)
    p.add_argument("--concurrency", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="the workload's seed: the same seed, the same hit rates")
    p.add_argument("--plot", metavar="PNG", help="draw hit rate and load latency per configuration into PNG and "
                   "<PNG stem>-latency.png, and hit rate against capacity into <PNG stem>-capacity.png")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': to stdout, the table to "
                   "stderr)")
    p.add_argument("--metrics-overhead", action="store_true",
                   help="also run the first configuration with metrics off and on (a scraped Prometheus endpoint "
                        "every second and the periodic log line), interleaved off, on, off, ..., off, and print the "
                        "median throughput and CPU ratios with their spread")
    p.add_argument("--overhead-rounds", type=int, default=8, metavar="N",
                   help="runs with metrics on in --metrics-overhead (each between two runs with them off; default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_capacities(text: str, model: ModelConfig, tokens_per_block: int) -> list[int]:
    """'500,0.5GB' -> CPU blocks at this block size (GB, G and GiB all mean GiB)."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        low = item.lower()
        unit = next((u for u in ("gib", "gb", "g") if low.endswith(u)), None)
        if unit is None:
            out.append(int(item))
        else:
            out.append(max(1, int(float(low[: -len(unit)]) * 2**30 // model.block_bytes(tokens_per_block))))
    return out


def main(args: argparse.Namespace) -> int:
    for name in ("conversations", "turns", "concurrency", "overhead_rounds"):
        if getattr(args, name) < 1:
            print(f"flexkv bench: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    model = MODEL_PRESETS[args.model]
    configs = [(name, replace(c)) for name, c in DEFAULT_CONFIGS if not (args.no_ssd and c.enable_ssd)]
    if args.config:
        configs = [(f"{i} {path}", load_config(path).cache_config) for i, path in enumerate(args.config, 1)]
    try:
        sweep = [(f"sweep {n}x{tpb}", CacheConfig(num_cpu_blocks=n, tokens_per_block=tpb))
                 for tpb in sorted({c.tokens_per_block for _, c in configs})
                 for n in parse_capacities(args.capacities, model, tpb)]
    except ValueError:
        print(f"flexkv bench: --capacities takes blocks or GiB separated by commas (500,0.5GB), got "
              f"{args.capacities!r}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json == "-" else sys.stdout
    spec = ChatWorkloadSpec(conversations=args.conversations, turns=args.turns, concurrency=args.concurrency,
                            seed=args.seed)
    print(f"workload: {spec.conversations} conversations x {spec.turns} turns, {spec.concurrency} open at once, "
          f"{spec.system_prompts} shared system prompts of {spec.system_prompt_tokens} tokens (seed {spec.seed})",
          file=out)
    print(f"model: {args.model}, {format_bytes(model.token_size_in_bytes)} of KV per token ({model.num_layers} "
          f"layers, {model.num_kv_heads} KV heads x {model.head_size}, {model.dtype_name})", file=out)
    runs = len(configs) + len(sweep) + (2 * args.overhead_rounds + 1 if args.metrics_overhead else 0)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=spec.num_requests * runs, unit="req", file=sys.stderr, leave=False)
    results, overhead = [], None
    with _ScratchSsd(args.ssd_dir, out) as scratch:
        try:
            for i, (name, cache_config) in enumerate(configs + sweep):
                results.append(run_config(name, scratch.own(cache_config, name), model, spec, progress,
                                          sweep=i >= len(configs)))
            if args.metrics_overhead:
                overhead = metrics_overhead(configs[0][1], model, spec, progress, scratch, args.overhead_rounds)
        finally:
            if progress is not None:
                progress.close()
    print(format_table(results), file=out)
    if overhead is not None:
        print(format_overhead(overhead), file=out)
    if args.json:
        data: Any = [asdict(r) for r in results]
        if overhead is not None:
            data = {"results": data, "metrics_overhead": overhead}
        if args.json == "-":
            print(json.dumps(data, indent=1))
        else:
            Path(args.json).write_text(json.dumps(data, indent=2))
    if args.plot:
        from .bench_plots import save

        print(f"plots: {', '.join(save(results, args.plot))}", file=out)
    return 0


class _ScratchSsd:
    """SSD tiers of the bench live in directories of its own (--ssd-dir, or a scratch directory removed at the
    end), one per configuration: never the directory of a config file, which a running cache may use."""

    def __init__(self, base: str | None, out: Any) -> None:
        self.base, self.out = base, out
        self.scratch: str | None = None
        self.count = 0

    def __enter__(self) -> _ScratchSsd:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def own(self, c: CacheConfig, name: str) -> CacheConfig:
        if not c.enable_ssd:
            return c
        if self.base is None and self.scratch is None:
            self.scratch = tempfile.mkdtemp(prefix="flexkv-bench-ssd-", dir="/var/tmp")
        self.count += 1
        d = os.path.join(self.base or self.scratch or "", f"config-{self.count}")
        if os.path.exists(d):
            raise FlexKVError(f"bench: {d} exists; give --ssd-dir an empty directory (the bench never writes into "
                              "a directory another cache may use)")
        given = c.ssd_cache_dir
        if given and given != "<--ssd-dir>":
            print(f"{name}: its SSD tier runs in {d}, not in the config's {given}", file=self.out)
        return replace(c, ssd_cache_dir=d)


def metrics_overhead(cache_config: CacheConfig, model: ModelConfig, spec: ChatWorkloadSpec, progress: Any,
                     scratch: _ScratchSsd, rounds: int = 8) -> dict[str, Any]:
    """Throughput and CPU time of one configuration with metrics off and on (a Prometheus endpoint scraped every
    second and the periodic log line every 50 requests), interleaved: off, on, off, on, ..., off (``rounds``
    runs on, ``rounds + 1`` off). Each run with metrics on is compared with the mean of the two runs around
    it, so a machine that gets busier or quieter during the measurement biases neither side; the result is
    the median of those ratios with their quartiles and range (``overhead_summary``)."""
    runs: dict[str, list[BenchResult]] = {"off": [], "on": []}
    for i in range(2 * rounds + 1):
        mode = "on" if i % 2 else "off"
        runs[mode].append(_overhead_run(mode, cache_config, model, spec, progress, scratch))
    return overhead_summary([r.requests_per_s for r in runs["off"]], [r.requests_per_s for r in runs["on"]],
                            [r.cpu_ms_per_request for r in runs["off"]], [r.cpu_ms_per_request for r in runs["on"]])


def overhead_summary(off_req_s: list[float], on_req_s: list[float], off_cpu_ms: list[float],
                     on_cpu_ms: list[float]) -> dict[str, Any]:
    """Per run with metrics on (run i, between runs i and i + 1 with them off): its throughput over the mean of
    its neighbours' (``ratios``; 0.98 means 2% slower) and their CPU time per request over its own
    (``cpu_ratios``; 0.98 means 2% more CPU). ``ratio`` and ``cpu_ratio`` are the medians; ``*_quartiles`` and
    ``*_range`` the spread; ``*_ci95`` a distribution-free 95% confidence interval of the median (order
    statistics n/2 -/+ 0.98 sqrt(n); the range when there are too few runs)."""
    def around(values: list[float], i: int) -> float:
        return (values[i] + values[i + 1]) / 2

    ratios = sorted(on / around(off_req_s, i) for i, on in enumerate(on_req_s))
    cpu = sorted(around(off_cpu_ms, i) / on for i, on in enumerate(on_cpu_ms) if on > 0)
    out: dict[str, Any] = {"rounds": len(on_req_s), "off_req_s": off_req_s, "on_req_s": on_req_s,
                           "off_cpu_ms_per_request": off_cpu_ms, "on_cpu_ms_per_request": on_cpu_ms}
    for key, values in (("ratio", ratios), ("cpu_ratio", cpu)):
        q = np.percentile(values, [25, 50, 75]) if values else [0.0] * 3
        out[f"{key}s"] = values
        out[key] = float(q[1])
        out[f"{key}_quartiles"] = [float(q[0]), float(q[2])]
        out[f"{key}_range"] = [float(values[0]), float(values[-1])] if values else [0.0, 0.0]
        out[f"{key}_ci95"] = median_ci95(values)
    return out


def median_ci95(values: list[float]) -> list[float]:
    """[low, high]: the order statistics that bound a sample's median with about 95% confidence, whatever
    the distribution (ranks n/2 -/+ 1.96 sqrt(n) / 2, 1-based, clipped to the sample)."""
    n = len(values)
    if n == 0:
        return [0.0, 0.0]
    ordered = sorted(values)
    half = 1.96 * n**0.5 / 2
    low, high = max(1, int(n / 2 - half)), min(n, int(np.ceil(1 + n / 2 + half)))
    return [float(ordered[low - 1]), float(ordered[high - 1])]


def format_overhead(o: dict[str, Any]) -> str:
    """The bench's overhead line: the medians with their quartiles and range."""
    def one(key: str) -> str:
        (c1, c2), (q1, q3), (lo, hi) = o[f"{key}_ci95"], o[f"{key}_quartiles"], o[f"{key}_range"]
        return (f"{o[key]:.3f} (95% CI of the median {c1:.3f}-{c2:.3f}, quartiles {q1:.3f}-{q3:.3f}, range "
                f"{lo:.3f}-{hi:.3f})")

    return (f"metrics overhead: throughput with metrics on / off = {one('ratio')}; CPU per request off / on = "
            f"{one('cpu_ratio')}; medians of {o['rounds']} runs with metrics on, each against the mean of the runs "
            "with them off before and after it (goal >= 0.98)")


def _overhead_run(mode: str, cache_config: CacheConfig, model: ModelConfig, spec: ChatWorkloadSpec, progress: Any,
                  scratch: _ScratchSsd) -> BenchResult:
    """One run of the overhead measurement: ``on`` serves a Prometheus endpoint that a thread scrapes every
    second and logs the periodic line every 50 requests (formatted, then filtered: not printed)."""
    import threading
    import urllib.request

    from .metrics import logger as metrics_logger

    settings = None
    stop = threading.Event()
    scraper = None
    if mode == "on":
        port = _free_port()
        settings = ServerSettings(metrics_port=port, num_log_interval_requests=50)

        def scrape() -> None:
            while not stop.wait(1.0):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
                except OSError:
                    pass  # not up yet, or closed

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
    level = metrics_logger.level
    metrics_logger.setLevel("WARNING")
    try:
        return run_config(f"overhead {mode}", scratch.own(cache_config, "overhead"), model, spec, progress,
                          settings=settings)
    finally:
        metrics_logger.setLevel(level)
        stop.set()
        if scraper is not None:
            scraper.join()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
