"""Throughput of a mixed offline workload through vLLM (CPU build, tiny random-weight model): FlexKV storing
blocks as they are computed (``flexkv_store_mode: computed``, the default) vs storing a request when it ends
(``finished``), with vLLM alone measured in the same run as the ceiling.

Each round is one ``LLM.generate()`` of fresh prompts (so every round stores): half of them share a
system prefix, half are unique, with prefill in chunks (``--chunk``) so stores-as-computed copies blocks while
prompts are still being prefilled. ``generate()`` returns once FlexKV's stores are done, so the timing holds
every copy. The configurations run in separate processes, interleaved (none, computed, finished, none, ...),
``--passes`` times; each row is the median over its processes of their median round. The FlexKV runs also
time the connector's hooks (``vllm_ttft.HookClock``): their share of the batch time is FlexKV's direct cost on
the engine's thread in each mode, resolved far below the spread of throughput between processes.

    python benchmarks/vllm_throughput.py [--passes 3] [--rounds 3] [--requests 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run with python -P too
from vllm_ttft import BLOCK, HookClock, make_model, run_child, tiny_llm  # noqa: E402

MODES = ("none", "computed", "finished")


def prompts_of(round_: int, requests: int, prefix: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) of one round: even requests share a system prefix, odd ones are unique."""
    import numpy as np

    rng = np.random.default_rng(1000 + round_)
    system = np.random.default_rng(7).integers(5, 4000, size=prefix).tolist()
    out = []
    for i in range(requests):
        body = rng.integers(5, 4000, size=int(rng.integers(256, 1024))).tolist()
        out.append(((system + body) if i % 2 == 0 else body, int(rng.integers(16, 64))))
    return out


def run_engine(args: argparse.Namespace) -> None:
    """One configuration, in this process; prints each round's seconds and token counts as JSON."""
    from vllm import SamplingParams

    flexkv = {"flexkv_store_mode": args.mode} if args.mode != "none" else None
    llm = tiny_llm(args.model, args.vllm_kv_tokens, flexkv, max_model_len=2048, max_num_seqs=8,
                   max_num_batched_tokens=args.chunk)
    clock = HookClock(llm) if flexkv is not None else None
    rounds = []
    for r in range(args.rounds):
        batch = prompts_of(r + 1000 * args.pass_index, args.requests, args.prefix)
        sps = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False) for _, n in batch]
        hooks = clock.seconds if clock else 0.0
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], sps, use_tqdm=False)
        seconds = time.perf_counter() - t0
        rounds.append({"seconds": seconds, "prompt_tokens": sum(len(p) for p, _ in batch),
                       "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                       "hook_seconds": (clock.seconds - hooks) if clock else 0.0})
    print("FLEXKV_RESULT " + json.dumps(rounds), flush=True)


def process_rate(rounds: list[dict]) -> float:
    """Tokens (prompt and output) per second of one process: its median round."""
    return statistics.median((r["prompt_tokens"] + r["output_tokens"]) / r["seconds"] for r in rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=3, help="processes per configuration, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="generate() batches per process")
    p.add_argument("--requests", type=int, default=24, help="requests per batch")
    p.add_argument("--prefix", type=int, default=512, help="tokens of the system prefix half the requests share")
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens (the prefill chunk)")
    p.add_argument("--vllm-kv-tokens", type=int, default=16384, help="vLLM's own KV cache, in tokens")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pass-index", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run_engine(args)
        return
    results: dict[str, list[list[dict]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model)
        config = Path(tmp) / "flexkv.json"
        config.write_text(json.dumps({"cache_config": {"enable_cpu": True, "cpu_cache_gb": 1,
                                                       "tokens_per_block": BLOCK}}))
        for pass_index in range(args.passes):
            for mode in MODES:
                results[mode].append(run_child(__file__, ["--mode", mode, "--model", str(model),
                                                          f"--pass-index={pass_index}"] + [
                    f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k in ("rounds", "requests", "prefix", "chunk", "vllm_kv_tokens")], config))
    rate = {m: statistics.median(process_rate(proc) for proc in results[m]) for m in MODES}
    per_pass = [process_rate(c) / process_rate(f) for c, f in zip(results["computed"], results["finished"])]
    print(f"vllm_throughput: {args.requests} requests per batch (half sharing a {args.prefix}-token prefix), "
          f"{args.rounds} batches per process, {args.passes} processes per configuration, prefill chunk "
          f"{args.chunk}, vLLM's CPU build")
    print(f"{'':>24} {'tokens/s':>9} {'vs alone':>9}")
    for m, name in zip(MODES, ("vLLM alone", "FlexKV, stores computed", "FlexKV, stores finished")):
        print(f"{name:>24} {rate[m]:>9.0f} {rate[m] / rate['none']:>9.3f}")
    for m in ("computed", "finished"):
        share = statistics.median(r["hook_seconds"] / r["seconds"] for proc in results[m] for r in proc)
        print(f"FlexKV's hooks on the engine thread, stores {m}: {share:.2%} of the batch time (median round)")
    print(f"computed / finished: {rate['computed'] / rate['finished']:.3f} (per pass: "
          f"{', '.join(f'{x:.3f}' for x in per_pass)}; goal: no regression beyond 2%, >= 0.98)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "tokens_per_s": rate}, indent=1))


if __name__ == "__main__":
    main()
