"""One real vLLM engine (the CPU build) kept running for several checks: commands on stdin, results on stdout.

    python tests/vllm_engine.py --model DIR [--config FLEXKV_JSON] [--tp 1|2] [--dtype float32]
        [--kv-cache-mib N] [--max-model-len N]

Without ``--config`` the engine runs without FlexKV. It prints ``READY`` once vLLM is up, then answers each
line of JSON it reads with one line ``RESULT <json>``:

- ``{"op": "generate", "prompts": [[ids...]], "salts": [str|null], "max_tokens": N}``: greedy outputs
  ``[{"tokens", "logprobs", "cached", "prompt_len"}]``, then stepped until the stores FlexKV ordered are
  done (another engine looks for them next);
- ``{"op": "stats"}``: the scheduler-side connector's counters (``{}`` without FlexKV).

vLLM's scheduler runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); with ``--tp 2`` its two
workers are processes of their own. tests/vllm_helpers.py starts and drives it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BLOCK = 32  # vLLM's CPU backend needs a multiple of 32


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--config", default="")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-mib", type=float, default=64)
    p.add_argument("--max-model-len", type=int, default=1536)
    args = p.parse_args()
    if args.config:
        os.environ["FLEXKV_CONFIG_PATH"] = args.config
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if args.config:
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="FlexKVConnectorV1", kv_role="kv_both",
                                                    kv_load_failure_policy="recompute")
    llm = LLM(model=args.model, skip_tokenizer_init=True, block_size=BLOCK, max_model_len=args.max_model_len,
              dtype=args.dtype, enable_prefix_caching=True, enforce_eager=True, tensor_parallel_size=args.tp,
              kv_cache_memory_bytes=int(args.kv_cache_mib * 2**20), max_num_seqs=8, seed=0, **kw)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "generate":
            out = generate(llm, SamplingParams(temperature=0, max_tokens=cmd.get("max_tokens", 12), logprobs=1,
                                               detokenize=False), cmd["prompts"], cmd.get("salts"))
            settle(llm)
        elif cmd["op"] == "stats":
            out = counters()
        else:
            raise SystemExit(f"unknown op {cmd['op']!r}")
        print("RESULT " + json.dumps(out), flush=True)


def generate(llm, params, prompts: list[list[int]], salts: list[str | None] | None) -> list[dict]:
    inputs = []
    for i, pr in enumerate(prompts):
        item = {"prompt_token_ids": pr}
        if salts and salts[i]:
            item["cache_salt"] = salts[i]
        inputs.append(item)
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids),
             "logprobs": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)],
             "cached": int(o.num_cached_tokens or 0), "prompt_len": len(o.prompt_token_ids)} for o in outs]


def settle(llm, timeout_s: float = 20.0) -> None:
    """Steps the engine with a one-token request (shorter than a block: nothing of it is stored) until every
    store FlexKV ordered is reported done, so that the blocks are readable when this returns."""
    from vllm import SamplingParams

    sides = schedulers()
    deadline = time.monotonic() + timeout_s
    while any(len(s.ledger) for s in sides) and time.monotonic() < deadline:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1, detokenize=False),
                     use_tqdm=False)


def schedulers() -> list:
    if "flexkv.adapters.vllm.scheduler_side" not in sys.modules:
        return []
    from flexkv.adapters.vllm.scheduler_side import live_schedulers

    return live_schedulers()


def counters() -> dict:
    out: dict = {}
    for side in schedulers():
        for k, v in side.stats().items():
            out[k] = out.get(k, 0) + v
    return out


if __name__ == "__main__":
    main()
