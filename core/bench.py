"""``flexkv bench``: replays a multi-turn chat workload through KVManager against several
cache configurations and prints the manual's table (hit rate, transfer latency, throughput)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from .chat_workload import ChatWorkloadSpec, chat_requests
from .config import MODEL_PRESETS, CacheConfig, ModelConfig, format_bytes
from .config_file import load_config
from .errors import FlexKVError
from .kv_manager import KVManager
from .layout import EngineLayout

# The manual's two configurations (chapter 17.3): a small cache with 16-token
# blocks and a large one with 32-token blocks; and the small CPU tier backed by
# an SSD tier (the manual's CPU + SSD deployment, 17.1), in --ssd-dir.
DEFAULT_CONFIGS: list[tuple[str, CacheConfig]] = [
    ("1 small", CacheConfig(num_cpu_blocks=10000, tokens_per_block=16)),
    ("2 large", CacheConfig(num_cpu_blocks=100000, tokens_per_block=32)),
    ("3 small+ssd", CacheConfig(num_cpu_blocks=10000, tokens_per_block=16, enable_ssd=True, num_ssd_blocks=100000,
                                ssd_cache_dir="<--ssd-dir>")),
]

# 256 bytes of KV per token: big enough to move real bytes, small enough that the
# large configuration's CPU tier (3.2M tokens) fits in under 1 GiB.
BENCH_MODEL = ModelConfig(num_layers=2, num_kv_heads=1, head_size=32, dtype="float16")


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


def run_config(name: str, cache_config: CacheConfig, model: ModelConfig, spec: ChatWorkloadSpec,
               progress: object | None = None) -> BenchResult:
    """Replays the workload: for each request a get (load what is cached) then a put (store the rest)."""
    tpb = cache_config.tokens_per_block
    max_tokens = spec.system_prompt_tokens + spec.turns * (spec.user_tokens[1] + spec.answer_tokens[1])
    engine_blocks = max_tokens // tpb + 1
    block_bytes = model.block_bytes(tpb)
    # The engine's paged KV memory: one request at a time, token i of the prompt in slot i.
    engine = np.random.default_rng(1).integers(0, 255, size=(engine_blocks, block_bytes), dtype=np.uint8)
    latencies: list[float] = []
    requests = 0
    prompt_tokens = 0
    with KVManager(model, cache_config) as kv:
        kv.register_kv_caches(EngineLayout.from_block_views([engine]))
        start = time.perf_counter()
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
            kv.wait(put_id)
            requests += 1
            prompt_tokens += len(tokens)
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
        stats = kv.cache_stats()
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return BenchResult(
        name=name, num_cpu_blocks=cache_config.num_cpu_blocks, tokens_per_block=tpb,
        capacity_tokens=cache_config.num_cpu_blocks * tpb, capacity_bytes=cache_config.num_cpu_blocks * block_bytes,
        requests=requests, prompt_tokens=prompt_tokens, hit_tokens=stats["get_hit_tokens"],
        hit_rate=stats["get_hit_tokens"] / prompt_tokens if prompt_tokens else 0.0,
        ssd_hit_tokens=stats["ssd_hit_tokens"],
        num_ssd_blocks=cache_config.num_ssd_blocks if cache_config.enable_ssd else 0,
        transfer_p50_ms=float(np.percentile(lat, 50)), transfer_p99_ms=float(np.percentile(lat, 99)),
        requests_per_s=requests / elapsed if elapsed > 0 else 0.0, evicted_blocks=stats["cpu"]["evicted"])


def format_table(results: list[BenchResult]) -> str:
    head = ("config", "capacity", "block size", "hit rate", "of which SSD", "transfer p50/p99", "throughput")
    rows = [head]
    for r in results:
        capacity = f"{r.num_cpu_blocks} blocks ({format_bytes(r.capacity_bytes)})"
        if r.num_ssd_blocks:
            capacity += f" + SSD {r.num_ssd_blocks}"
        ssd = f"{100 * r.ssd_hit_tokens / r.prompt_tokens:.1f}%" if r.num_ssd_blocks and r.prompt_tokens else "-"
        rows.append((r.name, capacity, str(r.tokens_per_block), f"{100 * r.hit_rate:.1f}%", ssd,
                     f"{r.transfer_p50_ms:.2f} / {r.transfer_p99_ms:.2f} ms", f"{r.requests_per_s:.0f} req/s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(results: list[BenchResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlexKVError("--plot needs matplotlib: pip install 'flexkv[plot]' (or pip install matplotlib)") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    for tpb in sorted({r.tokens_per_block for r in results}):
        pts = sorted((r.capacity_tokens, 100 * r.hit_rate) for r in results if r.tokens_per_block == tpb)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"block {tpb}")
    ax.set_xscale("log")
    ax.set_xlabel("CPU cache capacity (tokens)")
    ax.set_ylabel("hit rate (% of prompt tokens)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("FlexKV bench: multi-turn chat replay")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="a FlexKV config file to bench (repeatable); default: the manual's two configurations")
    p.add_argument("--capacities", default="", metavar="N,N,...",
                   help="extra CPU capacities in blocks, run at each block size of the configs (for --plot)")
    p.add_argument("--ssd-dir", default=None, metavar="DIR",
                   help="directory for the default CPU + SSD configuration (on a disk with O_DIRECT; default: a new "
                        "directory under /var/tmp, removed afterwards)")
    p.add_argument("--no-ssd", action="store_true", help="skip the default CPU + SSD configuration")
    p.add_argument("--model", default=None, choices=sorted(MODEL_PRESETS),
                   help="model shape (bytes per token); default: a 256-bytes-per-token shape")
    p.add_argument("--conversations", type=int, default=ChatWorkloadSpec.conversations)
    p.add_argument("--turns", type=int, default=ChatWorkloadSpec.turns)
    p.add_argument("--concurrency", type=int, default=ChatWorkloadSpec.concurrency)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PNG", help="draw hit rate against capacity into this file")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    for name in ("conversations", "turns", "concurrency"):
        if getattr(args, name) < 1:
            print(f"flexkv bench: --{name} must be at least 1", file=sys.stderr)
            return 2
    model = MODEL_PRESETS[args.model] if args.model else BENCH_MODEL
    scratch = None
    configs = [(name, replace(c)) for name, c in DEFAULT_CONFIGS if not (args.no_ssd and c.enable_ssd)]
    for _, c in configs:
        if c.enable_ssd:
            if args.ssd_dir is None:
                scratch = tempfile.mkdtemp(prefix="flexkv-bench-ssd-", dir="/var/tmp")
            c.ssd_cache_dir = args.ssd_dir or scratch
    if args.config:
        configs = []
        for i, path in enumerate(args.config, 1):
            cfg = load_config(path)
            configs.append((f"{i} {path}", cfg.cache_config))
    try:
        extra = [int(x) for x in args.capacities.split(",") if x.strip()]
    except ValueError:
        print(f"flexkv bench: --capacities must be integers separated by commas, got {args.capacities!r}",
              file=sys.stderr)
        return 2
    for tpb in sorted({c.tokens_per_block for _, c in configs}):
        for n in extra:
            configs.append((f"sweep {n}x{tpb}", CacheConfig(num_cpu_blocks=n, tokens_per_block=tpb)))
    spec = ChatWorkloadSpec(conversations=args.conversations, turns=args.turns, concurrency=args.concurrency,
                            seed=args.seed)
    print(f"workload: {spec.conversations} conversations x {spec.turns} turns, {spec.concurrency} open at once, "
          f"{spec.system_prompts} shared system prompts of {spec.system_prompt_tokens} tokens (seed {spec.seed})")
    print(f"model: {model.token_size_in_bytes} bytes of KV per token ({model.num_layers} layers, "
          f"{model.num_kv_heads} KV heads x {model.head_size}, {model.dtype_name})")
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=spec.num_requests * len(configs), unit="req", file=sys.stderr, leave=False)
    results = []
    try:
        for name, cache_config in configs:
            results.append(run_config(name, cache_config, model, spec, progress))
    finally:
        if progress is not None:
            progress.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0

