"""Runs one scenario through real vLLM (the CPU build) and prints its results as JSON.

    python tests/vllm_driver.py SCENARIO --model DIR --config FLEXKV_JSON --connector none|builtin|module
        [--kv-cache-mib N] [--multiprocessing]

The result is the line that starts with FLEXKV_RESULT. Each scenario runs in its own process
(tests/test_vllm_e2e.py starts them): a vLLM engine per process, as in production, and a fresh process
is what "a later engine finds what an earlier one stored" needs.
Prompts are token ids; sampling is greedy with logprobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vllm_engine import generate as engine_generate

BLOCK = 32  # vLLM's CPU backend needs a multiple of 32


def conversation_prompts(seed: int, turns: int, first: int, later: int) -> list[list[int]]:
    """The user parts of a multi-turn chat: random token ids (the model's replies are appended by run)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(5, 1000, size=first if t == 0 else later).tolist() for t in range(turns)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["chat", "batch", "salts", "prefix", "reset", "handoff", "depth", "fresh"])
    p.add_argument("--model", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--connector", choices=["none", "builtin", "module"], default="builtin")
    p.add_argument("--kv-cache-mib", type=float, default=64)
    p.add_argument("--multiprocessing", action="store_true")
    p.add_argument("--part", choices=["a", "b"], help="handoff: a runs the chat's first two turns and saves the "
                   "conversations to --state; b continues them with the third turn")
    p.add_argument("--state", help="handoff: the file of the conversations")
    p.add_argument("--max-batched-tokens", type=int, default=None, help="vLLM's max_num_batched_tokens (chunks)")
    p.add_argument("--late-reports", action="store_true",
                   help="fault injection: copies are seen done 16 steps late, as slow GPU copies would be (with "
                        "--connector module: the connector of tests/vllm_fault_connector.py)")
    p.add_argument("--load-mode", choices=["async", "layerwise"], default="async")
    p.add_argument("--store-mode", choices=["computed", "finished"], default="computed")
    p.add_argument("--async-scheduling", action="store_true",
                   help="vLLM's async scheduling, which its CPU build turns off (see force_async_scheduling)")
    p.add_argument("--prompts", help="scenario fresh: a JSON file of prompts (token id lists)")
    p.add_argument("--drop-last-block", action="store_true",
                   help="fault injection: every load loses its last block, as if it was evicted meanwhile (with "
                        "--connector module: the connector of tests/vllm_fault_connector.py)")
    p.add_argument("--keep-connector-cache", action="store_true",
                   help="reset scenario: reset_prefix_cache(reset_connector=False), vLLM's own cache only")
    args = p.parse_args()
    os.environ["FLEXKV_CONFIG_PATH"] = args.config
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.multiprocessing else "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if args.connector != "none":
        ktc = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
        if args.connector == "module":
            ktc["kv_connector_module_path"] = "flexkv.adapters.vllm"
        if args.drop_last_block:  # this file's folder is sys.path[0]: vLLM imports the module from there
            if args.connector != "module" or args.multiprocessing:
                p.error("--drop-last-block needs --connector module without --multiprocessing")
            ktc.update(kv_connector="LosesLastBlockConnector", kv_connector_module_path="vllm_fault_connector")
        if args.late_reports:
            if args.connector != "module" or args.multiprocessing:
                p.error("--late-reports needs --connector module without --multiprocessing")
            ktc.update(kv_connector="LateReportsConnector", kv_connector_module_path="vllm_fault_connector")
        extra = {"flexkv_load_mode": args.load_mode, "flexkv_store_mode": args.store_mode}
        ktc["kv_connector_extra_config"] = {k: v for k, v in extra.items() if v not in ("async", "computed")}
        kw["kv_transfer_config"] = KVTransferConfig(**ktc)
    if args.max_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_batched_tokens
    if args.async_scheduling:
        if args.multiprocessing:
            p.error("--async-scheduling needs the engine in this process (no --multiprocessing)")
        force_async_scheduling()
    llm = LLM(model=args.model, skip_tokenizer_init=True, block_size=BLOCK, max_model_len=1536, dtype="bfloat16",
              enable_prefix_caching=True, enforce_eager=True, kv_cache_memory_bytes=int(args.kv_cache_mib * 2**20),
              max_num_seqs=8, seed=0, disable_log_stats=False, **kw)  # stats on: get_metrics counts preemptions
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=1, detokenize=False)

    def generate(prompts: list[list[int]], salts: list[str | None] | None = None, params=sp) -> list[dict]:
        return engine_generate(llm, params, prompts, salts)

    result: dict = {"turns": []}
    if args.scenario == "chat":
        # Two conversations, turns interleaved, so a small vLLM KV cache evicts one while the other runs.
        chats = {c: conversation_prompts(c, 3, 700, 150) for c in (1, 2)}
        history: dict[int, list[int]] = {1: [], 2: []}
        for turn in range(3):
            for c in (1, 2):
                prompt = history[c] + chats[c][turn]
                out = generate([prompt])[0]
                history[c] = prompt + out["tokens"]
                result["turns"].append(out)
    elif args.scenario == "handoff":  # the chat's conversations, begun by one engine and ended by another
        chats = {c: conversation_prompts(c, 3, 700, 150) for c in (1, 2)}
        history = {1: [], 2: []}
        turns = range(2) if args.part == "a" else range(2, 3)
        if args.part == "b":
            with open(args.state, encoding="utf-8") as f:
                history = {int(c): h for c, h in json.load(f).items()}
        for turn in turns:
            for c in (1, 2):
                prompt = history[c] + chats[c][turn]
                out = generate([prompt])[0]
                history[c] = prompt + out["tokens"]
                result["turns"].append(out)
        if args.part == "a":
            with open(args.state, "w", encoding="utf-8") as f:
                json.dump(history, f)
    elif args.scenario == "batch":
        # Eight requests at once whose prompts fill whole blocks: the ones vLLM admits fill a small KV cache,
        # and the blocks their answers need next make vLLM preempt some of them.
        prompts = [conversation_prompts(10 + i, 1, 16 * BLOCK, 0)[0] for i in range(8)]
        longer = SamplingParams(temperature=0, max_tokens=48, logprobs=1, detokenize=False)
        generate(prompts, params=longer)  # stores every prompt's blocks (with FlexKV)
        result["turns"] = generate(prompts, params=longer)  # again: preempted and resumed requests load
    elif args.scenario == "salts":
        prompt = conversation_prompts(20, 1, 640, 0)[0]
        result["turns"] = [generate([prompt], ["tenant-a"])[0]]
        result["turns"].append(generate([prompt], ["tenant-b"])[0])  # another salt: must not hit tenant-a's
        result["turns"].append(generate([prompt], ["tenant-a"])[0])
    elif args.scenario == "prefix":  # the same prompt twice: the second finds the first's blocks cached
        prompt = conversation_prompts(30, 1, 800, 0)[0]
        result["turns"] = [generate([prompt])[0], generate([prompt])[0]]
    elif args.scenario == "depth":
        result.update(depth(llm, generate, SamplingParams, reference=args.connector == "none"))
    elif args.scenario == "fresh":  # after "depth" in another process: what its batch stored, from SSD
        with open(args.prompts) as f:  # one at a time: the same batches as the reference's, so the same bits
            result["turns"] = [generate([p])[0] for p in json.load(f)]

    elif args.scenario == "reset":  # an RL trainer's weight update: the cache is cleared through vLLM
        prompt = conversation_prompts(40, 1, 640, 0)[0]
        result["turns"] = [generate([prompt])[0]]  # stores the prompt's blocks in FlexKV
        generate([[1, 2, 3]])  # steps in which the stores of the first request finish
        generate([[4, 5, 6]])
        result["reset_ok"] = False
        for _ in range(10):  # FlexKV refuses a reset while workers still copy: later steps end the copies
            if llm.reset_prefix_cache(reset_connector=not args.keep_connector_cache):
                result["reset_ok"] = True
                break
            generate([[7, 8, 9]])
        before = _flexkv_counters().get("hit_tokens", 0)
        result["turns"].append(generate([prompt])[0])
        result["hits_after_reset"] = _flexkv_counters().get("hit_tokens", 0) - before

    result["flexkv"] = _flexkv_counters()
    result["preemptions"] = _preemptions(llm)
    result["async_scheduling"] = bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)
    print("FLEXKV_RESULT " + json.dumps(result), flush=True)


def force_async_scheduling() -> None:
    """vLLM's CPU platform turns async scheduling off in its config check ("not required on CPU"); this turns it
    back on after that check, so that the scheduler runs a step ahead of the worker as on a GPU."""
    from vllm.platforms.cpu import CpuPlatform

    check = CpuPlatform.check_and_update_config.__func__

    def check_then_async(cls, vllm_config) -> None:
        check(cls, vllm_config)
        vllm_config.scheduler_config.async_scheduling = True

    CpuPlatform.check_and_update_config = classmethod(check_then_async)


def shared_prefix_prompts(n: int, seed: int) -> list[list[int]]:
    """n prompts of a 640-token shared prefix (20 blocks) and 96 tokens of their own (23 blocks in all)."""
    prefix = conversation_prompts(60, 1, 20 * BLOCK, 0)[0]
    return [prefix + conversation_prompts(seed + i, 1, 96, 0)[0] for i in range(n)]


def depth(llm, generate, sampling_params, reference: bool) -> dict:
    """A long prompt aborted after its second prefill chunk, then resubmitted (vLLM's own prefix cache
    emptied, so only FlexKV can serve it); then a batch sharing a prefix that makes vLLM preempt."""
    out: dict = {}
    long_prompt = conversation_prompts(40, 1, 1200, 0)[0]
    if not reference:
        from flexkv.adapters.vllm.scheduler_side import live_schedulers

        (side,) = live_schedulers()
        engine = llm.llm_engine
        engine.add_request("aborted", {"prompt_token_ids": long_prompt},
                           sampling_params(temperature=0, max_tokens=12, detokenize=False))
        engine.step()
        engine.step()
        out["stored_before_abort"] = side.stored_tokens
        engine.abort_request(["aborted"])
        while side.has_pending_stores() or engine.has_unfinished_requests():
            engine.step()
        out["prefix_cache_reset"] = bool(llm.reset_prefix_cache())
        hits = side.hit_tokens
    out["retry"] = generate([long_prompt])[0]
    if not reference:
        out["retry_hit_tokens"] = side.hit_tokens - hits
    # 736-token prompts and 33 tokens out: each request's last step fills its 24th block, so the batch's last
    # copies are still running when generate() returns.
    longer = sampling_params(temperature=0, max_tokens=33, logprobs=1, detokenize=False)
    prompts = shared_prefix_prompts(8, 10)
    out["turns"] = generate(prompts, params=longer)
    out["preemptions"] = _preemptions(llm)
    # Then a prompt whose three chunks are computed, and the process exits with it still running.
    unfinished = conversation_prompts(70, 1, 700, 0)[0]
    if reference:  # what a fresh process asks afterwards (24 or 21 whole blocks each), and must answer
        out["fresh_prompts"] = [p + t["tokens"] for p, t in zip(prompts, out["turns"])] + [unfinished]
        out["fresh"] = [generate([p])[0] for p in out["fresh_prompts"]]
    else:
        out["stores_in_flight_after_generate"] = len(side.ledger)
        engine.add_request("unfinished", {"prompt_token_ids": unfinished},
                           sampling_params(temperature=0, max_tokens=12, detokenize=False))
        for _ in range(3):
            engine.step()
        out["stores_in_flight_at_exit"] = len(side.ledger)
    return out


def _flexkv_counters() -> dict:
    """The connector's counters when vLLM's scheduler runs in this process (not with multiprocessing)."""
    if "flexkv.adapters.vllm.scheduler_side" not in sys.modules:
        return {}
    from flexkv.adapters.vllm.scheduler_side import live_schedulers
    from flexkv.adapters.vllm.worker_side import live_workers

    out: dict = {"hit_tokens": 0, "stored_tokens": 0, "failures": 0, "ssd_hit_tokens": 0}
    for side in [*live_schedulers(), *live_workers()]:
        for k, v in side.stats().items():
            out[k] = out.get(k, 0) + v
    return out


def _preemptions(llm) -> int:
    """vLLM's own count of preempted requests (its vllm:num_preemptions counter, summed over engines)."""
    return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


if __name__ == "__main__":
    main()
