"""Time to first token of a multi-turn chat workload through real vLLM (its CPU build), with FlexKV's
connector vs vLLM alone with prefix caching on, in the same run.

Several conversations take turns; each turn resends the whole history plus a new user message. vLLM's own
KV cache holds about two conversations, so between two turns of one conversation the others evict it and
vLLM alone recomputes the history; FlexKV's CPU tier keeps every conversation. TTFT is the time from adding a
request (``max_tokens=1``) to the engine step whose output carries its first token, as a server streams it;
the engine then steps on, untimed, until idle (FlexKV's stores of the request finish there, as they would
after the first token in a server); the assistant's reply appended to the
history is a fixed random stand-in, so both runs see identical prompts. The model is a Llama-shaped model
with random weights, made on the fly (4 layers, hidden 512, 4 KV heads of 64, bf16).

    python benchmarks/vllm_ttft.py [--conversations 6] [--turns 4] [--server] [--json out.json]

``--server`` adds a third run: FlexKV in server mode (the engine starts ``flexkv serve`` as its child and is
its client over ipc), compared with FlexKV in the engine's process.

``--retry`` adds, in each run, the retry of an aborted long prompt: a ``--retry-tokens`` prompt is prefilled in
chunks of ``--chunk`` tokens, aborted after ``--abort-after`` chunks, vLLM's own prefix cache is emptied (as
other traffic would evict it) and the prompt is sent again; its TTFT is compared (FlexKV stores each chunk's
blocks as they are computed, so the retry loads them).

``--limits`` adds two runs whose vLLM KV cache holds every conversation (``--large-kv-tokens``): vLLM alone
there is the limit a FlexKV hit can reach (later turns: FlexKV with the small vLLM cache vs vLLM alone with
the large one; goal within 1.05x), and FlexKV there shows its cost on turns vLLM's own prefix cache serves
(vLLM alone / FlexKV, both with the large cache; goal >= 0.98). Since TTFT moves a few percent from one
process to the next on a small machine, the FlexKV runs also time the connector's hooks, which vLLM calls on
the engine's thread: their time before a request's first token is FlexKV's direct cost on its TTFT.

``--paired`` runs instead one configuration, FlexKV with the large vLLM cache, in which each turn half the
conversations are served by vLLM's own cache and, after that cache is emptied, the other half by FlexKV
hits (see ``paired_hits``): goal (a) measured inside one process, free of the spread between processes.

Each configuration runs in its own process (one vLLM engine per process). ``--passes N`` runs every
configuration N times, interleaved (none, flexkv, ..., none, flexkv, ...), so that a drift of the machine
hits all of them alike; each figure is then the median over a configuration's processes, and the (a) and
(c) ratios of each pass are listed as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 32


def make_model(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                      initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)


def workload(conversations: int, turns: int, first: int, later: int, reply: int) -> list[list[list[int]]]:
    """prompts[turn][conversation]: the full history each turn sends."""
    import numpy as np

    rng = np.random.default_rng(0)
    history = [[] for _ in range(conversations)]
    prompts = []
    for t in range(turns):
        row = []
        for c in range(conversations):
            history[c] = history[c] + rng.integers(5, 4000, size=first if t == 0 else later).tolist()
            row.append(list(history[c]))
            history[c] = history[c] + rng.integers(5, 4000, size=reply).tolist()
        prompts.append(row)
    return prompts


def tiny_llm(model: str, kv_tokens: int, flexkv: dict[str, str] | None, **kw):
    """An in-process vLLM engine (CPU build) of the tiny model with a KV cache of kv_tokens tokens, warmed up;
    with FlexKV's connector when ``flexkv`` (its kv_connector_extra_config) is not None."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    if flexkv is not None:
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="FlexKVConnectorV1", kv_role="kv_both",
                                                    kv_load_failure_policy="recompute",
                                                    kv_connector_extra_config=flexkv)
    per_token = 4 * 2 * 4 * 64 * 2  # layers x (K, V) x KV heads x head size x bf16
    llm = LLM(model=model, skip_tokenizer_init=True, block_size=BLOCK, dtype="bfloat16", enable_prefix_caching=True,
              enforce_eager=True, kv_cache_memory_bytes=kv_tokens * per_token, seed=0, **kw)
    llm.generate([{"prompt_token_ids": [7] * 64}], SamplingParams(max_tokens=1), use_tqdm=False)
    return llm


def run_child(script: str, args: list[str], config: Path) -> list[dict]:
    """Runs a benchmark script's one-configuration mode in a process of its own with FlexKV's config at
    ``config``; returns the JSON it printed on its FLEXKV_RESULT line."""
    env = dict(os.environ, FLEXKV_CONFIG_PATH=str(config))
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLEXKV_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(args[:2])} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("FLEXKV_RESULT "):])


def run_engine(args: argparse.Namespace) -> None:
    """One configuration, in this process; prints the TTFT of every request as JSON."""
    from vllm import SamplingParams

    kv_tokens = args.large_kv_tokens if args.mode.endswith("large") or args.mode == "paired" else args.vllm_kv_tokens
    flexkv = {"flexkv_load_mode": args.load_mode} if args.mode in ("flexkv", "server", "flexkv-large", "paired") \
        else None
    kw = {"max_num_batched_tokens": args.chunk} if args.retry else {}
    llm = tiny_llm(args.model, kv_tokens, flexkv, max_model_len=max(2048, args.retry_tokens + 64) if args.retry
                   else 2048, max_num_seqs=4, **kw)
    sp = SamplingParams(temperature=0, max_tokens=1, detokenize=False)
    prompts = workload(args.conversations, args.turns, args.first, args.later, args.reply)
    if args.mode == "paired":
        print("FLEXKV_RESULT " + json.dumps(paired_hits(llm, sp, prompts)), flush=True)
        return
    clock = HookClock(llm) if flexkv is not None else None
    ttft = []
    for turn, row in enumerate(prompts):
        for prompt in row:
            before = clock.seconds if clock else 0.0
            steps: dict = {}
            seconds = first_token_seconds(llm, prompt, sp, clock, steps)
            ttft.append({"turn": turn, "tokens": len(prompt), "seconds": seconds,
                         "hook_seconds": clock.at_first_token - before if clock else 0.0,
                         "wait_steps_seconds": steps["wait_steps_s"],
                         "forward_step_hook_seconds": clock.at_first_token - clock.at_first_token_step if clock
                         else 0.0})
    if args.retry:
        ttft += retry_after_abort(llm, sp, args)
    print("FLEXKV_RESULT " + json.dumps(ttft), flush=True)


def retry_after_abort(llm, sp, args: argparse.Namespace) -> list[dict]:
    """TTFT of a long prompt sent again after it was aborted mid-prefill (vLLM's own prefix cache emptied)."""
    import numpy as np

    out = []
    engine = llm.llm_engine
    for i in range(3):
        prompt = np.random.default_rng(100 + i).integers(5, 4000, size=args.retry_tokens).tolist()
        # The previous request's blocks stay allocated until FlexKV's stores of them are reported; a step spent
        # waiting for that memory would leave the prompt one chunk short at its abort.
        for _ in range(50):
            engine.step()
        engine.add_request(f"long-{i}", {"prompt_token_ids": prompt}, sp)
        for _ in range(args.abort_after):
            engine.step()
        engine.abort_request([f"long-{i}"])
        for _ in range(50):  # let the abort and the stores of its chunks be reported
            engine.step()
        empty_vllm_cache(llm)
        out.append({"turn": -1, "tokens": len(prompt), "seconds": first_token_seconds(llm, prompt, sp)})
    return out


def paired_hits(llm, sp, prompts: list[list[list[int]]]) -> list[dict]:
    """Later turns served by a FlexKV hit and by vLLM's own cache, in one process (FlexKV, a vLLM cache that
    holds everything). Each turn, half the conversations ("vllm") send theirs while vLLM still holds their
    histories; then vLLM's own cache is emptied (FlexKV's kept) and the other half ("flexkv") send theirs, which
    FlexKV serves. The halves swap every turn (the "flexkv" half of a turn ran after the last reset, so vLLM
    holds its history at the next). Both halves send prompts of the same lengths."""
    from flexkv.adapters.vllm.scheduler_side import live_schedulers

    (scheduler,) = live_schedulers()
    out = []
    conversations = len(prompts[0])
    for turn, row in enumerate(prompts):
        halves = (range(turn % 2, conversations, 2), range(1 - turn % 2, conversations, 2))
        for served_by, half in zip(("vllm", "flexkv"), halves):
            if served_by == "flexkv":
                empty_vllm_cache(llm)
            for c in half:
                hits = scheduler.hit_tokens
                seconds = first_token_seconds(llm, row[c], sp)
                hit = scheduler.hit_tokens - hits
                if turn >= 1 and (hit > 0) != (served_by == "flexkv"):
                    raise SystemExit(f"turn {turn}, conversation {c}: {hit} tokens hit FlexKV, "
                                     f"but it should have been served by {served_by}")
                out.append({"turn": turn, "served_by": served_by, "tokens": len(row[c]), "seconds": seconds,
                            "flexkv_hit_tokens": hit})
    return out


def empty_vllm_cache(llm) -> None:
    """Empties vLLM's own prefix cache; FlexKV keeps every block. vLLM refuses while a block is in use (a finished
    request's blocks stay allocated until FlexKV reports their stores), so the engine steps until it can."""
    for _ in range(200):
        if llm.reset_prefix_cache():
            return
        llm.llm_engine.step()
    raise SystemExit("vLLM kept refusing to reset its prefix cache")


_REQUESTS = iter(range(1 << 62))


class HookClock:
    """Wall time inside the connector's hooks, which vLLM calls on the engine's thread, in line with the forward:
    FlexKV's direct cost on a request's TTFT, resolved far below the run-to-run noise of TTFT itself. Wraps the
    hooks of this in-process engine's two connector objects (the scheduler's and the worker's)."""

    SCHEDULER = ("get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                 "update_connector_output", "request_finished", "take_events", "has_pending_push_work",
                 "get_kv_connector_stats")
    WORKER = ("bind_connector_metadata", "handle_preemptions", "start_load_kv", "wait_for_layer_load",
              "save_kv_layer", "wait_for_save", "get_finished", "build_connector_worker_meta",
              "clear_connector_metadata", "get_kv_connector_stats")

    def __init__(self, llm) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        self.seconds = 0.0
        self.at_first_token = 0.0
        self.at_first_token_step = 0.0  # at the start of the step that gave the first token
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler.connector
        for obj, names in ((scheduler, self.SCHEDULER), (get_kv_transfer_group(), self.WORKER)):
            for name in names:
                setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, hook):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed


def first_token_seconds(llm, prompt: list[int], sp, clock: HookClock | None = None,
                        steps: dict | None = None) -> float:
    """Seconds from adding the request to the engine step whose output carries its first token; the engine
    then steps on, untimed, until nothing is left to do (stores in flight included). ``clock`` notes its hook
    time at the first token and at the start of that step; ``steps`` gets ``wait_steps_s``, the time of the
    steps before that one (a FlexKV hit loaded asynchronously waits for its load in such a step)."""
    engine = llm.llm_engine
    rid = f"ttft-{next(_REQUESTS)}"
    t0 = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
    first = None
    step_start, hooks_at_step = t0, 0.0
    while engine.has_unfinished_requests():
        if first is None:
            step_start, hooks_at_step = time.perf_counter(), clock.seconds if clock else 0.0
        for out in engine.step():
            if first is None and out.request_id == rid and out.outputs and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
                if clock is not None:
                    clock.at_first_token = clock.seconds
                    clock.at_first_token_step = hooks_at_step
                if steps is not None:
                    steps["wait_steps_s"] = step_start - t0
    assert first is not None, "the request produced no token"
    return first


def summary(ttft: list[dict]) -> dict[str, float]:
    later = sorted(r["seconds"] for r in ttft if r["turn"] >= 1)
    out = {"mean_s": statistics.mean(later), "p90_s": later[int(0.9 * (len(later) - 1))],
           "turn1_mean_s": statistics.mean(r["seconds"] for r in ttft if r["turn"] == 0),
           "hooks_mean_s": statistics.mean(r.get("hook_seconds", 0.0) for r in ttft if r["turn"] >= 1),
           # what a hit costs beyond the forward: the steps it waited, FlexKV's hooks in the step of its forward
           "direct_mean_s": statistics.mean(r.get("wait_steps_seconds", 0.0) + r.get("forward_step_hook_seconds", 0.0)
                                            for r in ttft if r["turn"] >= 1)}
    retries = [r["seconds"] for r in ttft if r["turn"] == -1]
    if retries:
        out["retry_mean_s"] = statistics.mean(retries)
    return out


def paired_ratio(rows: list[dict]) -> float:
    """One paired process: the mean over later turns of (a turn's mean TTFT served by FlexKV / by vLLM)."""
    by_turn: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        if r["turn"] >= 1:
            by_turn.setdefault(r["turn"], {}).setdefault(r["served_by"], []).append(r["seconds"])
    return statistics.mean(statistics.mean(t["flexkv"]) / statistics.mean(t["vllm"]) for t in by_turn.values())


def report_paired(runs: list[list[dict]], args: argparse.Namespace) -> None:
    ratios = [paired_ratio(r) for r in runs]
    print(f"vllm_ttft --paired: {args.conversations} conversations x {args.turns} turns, FlexKV "
          f"({args.load_mode} loads) and a vLLM KV cache of {args.large_kv_tokens} tokens, {len(runs)} processes")
    print(f"TTFT of later turns served by a FlexKV hit / by vLLM's own cache: {statistics.median(ratios):.3f} "
          f"(median over processes; per process, the mean over turns of each turn's ratio: "
          f"{', '.join(f'{x:.3f}' for x in ratios)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"paired": runs, "ratios": ratios}, indent=1))


def run_mode(mode: str, model: Path, config: dict, tmp: Path, args: argparse.Namespace) -> list[dict]:
    """One configuration's run in a process of its own: the TTFT of each request."""
    path = tmp / f"flexkv-{mode}.json"
    path.write_text(json.dumps(config))
    return run_child(__file__, ["--mode", mode, "--model", str(model)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k in ("conversations", "turns", "first", "later", "reply", "vllm_kv_tokens", "retry_tokens",
                 "chunk", "abort_after", "large_kv_tokens", "load_mode")] + (["--retry"] if args.retry else []), path)


def median_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over a configuration's processes."""
    return {k: statistics.median(s[k] for s in summaries) for k in summaries[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=1, help="processes per configuration, interleaved")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first", type=int, default=1200, help="tokens of the first user message")
    p.add_argument("--later", type=int, default=200, help="tokens of each later user message")
    p.add_argument("--reply", type=int, default=16, help="tokens of each assistant reply in the history")
    p.add_argument("--vllm-kv-tokens", type=int, default=4096, help="vLLM's own KV cache, in tokens")
    p.add_argument("--server", action="store_true", help="also run FlexKV in server mode")
    p.add_argument("--retry", action="store_true", help="also time the retry of an aborted long prompt")
    p.add_argument("--retry-tokens", type=int, default=3072)
    p.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens with --retry")
    p.add_argument("--abort-after", type=int, default=5, help="prefill chunks computed before the abort")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--load-mode", choices=["async", "layerwise"], default="async",
                   help="FlexKV's load mode (kv_connector_extra_config flexkv_load_mode)")
    p.add_argument("--limits", action="store_true", help="also run with a vLLM KV cache that holds everything")
    p.add_argument("--large-kv-tokens", type=int, default=32768, help="vLLM's KV cache with --limits, in tokens")
    p.add_argument("--paired", action="store_true",
                   help="instead: later turns served by FlexKV and by vLLM's own cache in one process (paired_hits)")
    p.add_argument("--mode", choices=["none", "flexkv", "server", "none-large", "flexkv-large", "paired"],
                   help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        run_engine(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        make_model(model)
        cache = {"enable_cpu": True, "cpu_cache_gb": 1, "tokens_per_block": BLOCK}
        configs = {"none": {"cache_config": cache}, "flexkv": {"cache_config": cache},
                   "none-large": {"cache_config": cache}, "flexkv-large": {"cache_config": cache},
                   "paired": {"cache_config": cache},
                   "server": {"cache_config": cache, "server_client_mode": True,
                              "server_recv_port": f"ipc://{tmp}/flexkv.sock"}}
        results: dict[str, list[list[dict]]] = {}
        modes = ["paired"] if args.paired else ["none", "flexkv"] + (["server"] if args.server else []) + \
            (["none-large", "flexkv-large"] if args.limits else [])
        for _ in range(args.passes):
            for mode in modes:
                results.setdefault(mode, []).append(run_mode(mode, model, configs[mode], Path(tmp), args))
    if args.paired:
        report_paired(results["paired"], args)
        return
    per_run = {m: [summary(r) for r in runs] for m, runs in results.items()}
    sums = {m: median_summary(s) for m, s in per_run.items()}
    base, fx = sums["none"], sums["flexkv"]
    print(f"vllm_ttft: {args.conversations} conversations x {args.turns} turns (first message {args.first} tokens, "
          f"then {args.later}), vLLM KV cache {args.vllm_kv_tokens} tokens, vLLM's CPU build"
          + (f"; medians over {args.passes} processes per configuration" if args.passes > 1 else ""))
    print(f"{'':>22} {'vLLM alone':>11} {'with FlexKV':>12} {'ratio':>7}")
    for key, name in (("mean_s", "TTFT mean, turns >= 2"), ("p90_s", "TTFT p90, turns >= 2"),
                      ("turn1_mean_s", "TTFT mean, turn 1")):
        print(f"{name:>22} {base[key] * 1e3:>9.1f}ms {fx[key] * 1e3:>10.1f}ms {base[key] / fx[key]:>6.2f}x")
    if args.retry:
        b, f = base["retry_mean_s"], fx["retry_mean_s"]
        print(f"{'retry of aborted prompt':>22} {b * 1e3:>9.1f}ms {f * 1e3:>10.1f}ms {b / f:>6.2f}x   "
              f"({args.retry_tokens} tokens, aborted after "
              f"{args.abort_after} chunks of {args.chunk}; goal >= 3x)")
    if args.limits:
        lim, fl = sums["none-large"], sums["flexkv-large"]
        print(f"{'':>22} {'vLLM cache':>11} {'FlexKV':>12} {'ratio':>7}   (later turns: the limit a hit can reach; "
              "goal FlexKV / limit <= 1.05)")
        print(f"{'TTFT mean, turns >= 2':>22} {lim['mean_s'] * 1e3:>9.1f}ms {fx['mean_s'] * 1e3:>10.1f}ms "
              f"{fx['mean_s'] / lim['mean_s']:>6.2f}x")
        print(f"{'':>22} a FlexKV hit's cost beyond the forward (steps waited for its load, hooks in its forward's "
              f"step): {fx['direct_mean_s'] * 1e3:.2f} ms vs {lim['direct_mean_s'] * 1e3:.2f} ms with vLLM's "
              f"cache (so FlexKV / limit <= "
              f"{(lim['mean_s'] + fx['direct_mean_s'] - lim['direct_mean_s']) / lim['mean_s']:.3f} from that cost)")
        print(f"{'':>22} {'vLLM alone':>11} {'with FlexKV':>12} {'ratio':>7}   (vLLM's cache holds everything; "
              "goal alone / FlexKV >= 0.98)")
        for key, name in (("mean_s", "TTFT mean, turns >= 2"), ("turn1_mean_s", "TTFT mean, turn 1")):
            print(f"{name:>22} {lim[key] * 1e3:>9.1f}ms {fl[key] * 1e3:>10.1f}ms {lim[key] / fl[key]:>6.2f}x")
        print(f"{'':>22} FlexKV's hooks on the engine thread before the first token, turns >= 2: "
              f"{fl['hooks_mean_s'] * 1e3:.2f} ms per request, {fl['hooks_mean_s'] / lim['mean_s']:.1%} of vLLM "
              f"alone's TTFT (so alone / FlexKV >= {lim['mean_s'] / (lim['mean_s'] + fl['hooks_mean_s']):.3f} "
              "from FlexKV's own work on that thread)")
        if args.passes > 1:
            a = [f["mean_s"] / n["mean_s"] for f, n in zip(per_run["flexkv"], per_run["none-large"])]
            c = [n["mean_s"] / f["mean_s"] for n, f in zip(per_run["none-large"], per_run["flexkv-large"])]
            print(f"per pass: (a) FlexKV / limit {', '.join(f'{x:.3f}' for x in a)}; "
                  f"(c) alone / FlexKV {', '.join(f'{x:.3f}' for x in c)}")
    if args.server:
        sv = sums["server"]
        print(f"{'':>22} {'in process':>11} {'server mode':>12} {'ratio':>7}   (goal: in process / server >= 0.95)")
        for key, name in (("mean_s", "TTFT mean, turns >= 2"), ("p90_s", "TTFT p90, turns >= 2"),
                          ("turn1_mean_s", "TTFT mean, turn 1")):
            print(f"{name:>22} {fx[key] * 1e3:>9.1f}ms {sv[key] * 1e3:>10.1f}ms {fx[key] / sv[key]:>6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": sums, "per_process": per_run}, indent=1))


if __name__ == "__main__":
    main()
