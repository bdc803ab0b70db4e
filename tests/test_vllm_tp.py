"""FlexKV under real vLLM (the CPU build) with tensor parallelism 2: two worker processes, each holding one of
the model's two KV heads, each copying its own head slice of every block; vLLM counts a load or a store done
only once both workers have reported it.

Multi-turn chats through an engine whose KV cache is too small to keep them (vLLM evicts, FlexKV serves),
compared with vLLM TP=2 alone whose KV cache keeps everything: greedy tokens and logprobs identical (TP=2
reproduces itself bit for bit on this backend; both engines run in float32, since in bfloat16 a random model's
argmax can flip between TP sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm_helpers import BLOCK, Engine, assert_same, random_prompt

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

SMALL_KV_MIB = 1.6  # per worker: about 50 blocks of 32 tokens (one float32 head), less than the chats need
LARGE_KV_MIB = 64


@pytest.fixture(scope="module")
def engines(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(vLLM TP=2 with FlexKV and a small KV cache, vLLM TP=2 alone with a large one), started together."""
    work = tmp_path_factory.mktemp("vllm-tp")
    config = work / "flexkv.json"
    config.write_text(json.dumps({"cache_config": {"enable_cpu": True, "num_cpu_blocks": 256,
                                                   "tokens_per_block": BLOCK}}))
    flexkv = Engine(tiny_model, work / "flexkv.log", config=config, tp=2, kv_mib=SMALL_KV_MIB)
    alone = Engine(tiny_model, work / "alone.log", tp=2, kv_mib=LARGE_KV_MIB)
    try:
        yield flexkv.wait_ready(), alone.wait_ready()
    finally:
        for e in (flexkv, alone):
            e.stop()
        for e in (flexkv, alone):
            e.close()


def chat(engine: Engine, rng_seed: int, conversations: int = 3, turns: int = 3) -> list[dict]:
    """Conversations taking turns: each turn sends the history (earlier prompts and answers) plus new tokens."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    users = [[random_prompt(rng, 500 if t == 0 else 120) for t in range(turns)] for _ in range(conversations)]
    history: list[list[int]] = [[] for _ in range(conversations)]
    outs = []
    for t in range(turns):
        for c in range(conversations):
            prompt = history[c] + users[c][t]
            out = engine.generate([prompt])[0]
            history[c] = prompt + out["tokens"]
            outs.append(out)
    return outs


def test_tp2_multi_turn_chats_match_vllm_alone_and_hit_flexkv(engines, seed: int) -> None:
    flexkv, alone = engines
    reference = chat(alone, seed)
    got = chat(flexkv, seed)
    assert_same(reference, got, tol=0.0)
    stats = flexkv.stats()
    assert stats["hit_tokens"] > 0, stats  # vLLM evicted the earlier turns; FlexKV brought them back
    assert stats["failures"] == 0, stats
    for a, b in zip(reference, got):  # every later turn computes only its new tokens, as with a large cache
        assert b["cached"] == a["cached"]
    assert sum(t["cached"] for t in got) > 0


def test_tp2_batch_of_shared_prefixes_loads_into_both_workers(engines, seed: int) -> None:
    """Requests of one batch share a long prefix that vLLM has evicted: each load lands in both workers."""
    import numpy as np

    flexkv, alone = engines
    rng = np.random.default_rng(seed)
    prefix = random_prompt(rng, 16 * BLOCK)
    first = flexkv.generate([prefix + random_prompt(rng, 40)])  # stores the prefix
    flooding = [random_prompt(rng, 20 * BLOCK) for _ in range(3)]  # evicts it from vLLM's own cache
    flexkv.generate(flooding)
    prompts = [prefix + random_prompt(rng, 40) for _ in range(3)]
    before = flexkv.stats()["hit_tokens"]
    got = flexkv.generate(prompts)
    assert flexkv.stats()["hit_tokens"] - before >= 16 * BLOCK
    assert all(o["cached"] >= 16 * BLOCK for o in got)
    assert_same(alone.generate(prompts), got, tol=0.0)
    assert first[0]["cached"] == 0
