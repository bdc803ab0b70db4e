"""The vLLM connector in depth, under real vLLM (its CPU build), in three engine processes shared by the tests:

- vLLM alone, with a KV cache that keeps everything (the reference);
- FlexKV (asynchronous loads, SSD tier) with a small KV cache and prefill chunks of 256 tokens: a long prompt
  aborted after its second chunk is resubmitted once vLLM's own prefix cache is emptied, then a batch whose
  prompts share a 640-token prefix makes vLLM preempt; the process then exits without shutting vLLM down;
- a fresh process with layer-wise loads, whose first requests share that prefix: it must come from SSD.

Greedy tokens and logprobs must equal vLLM alone's (for the preempted batch, tokens: a request recomputed
after preemption runs in other batches, which moves the last bits of its logprobs with or without FlexKV).
"""

from __future__ import annotations

import pytest

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

from conftest import LARGE_KV_MIB

CHUNKS = ("--max-batched-tokens", "256")
PREFIX_TOKENS = 640


@pytest.fixture(scope="module")
def ssd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"enable_ssd": True, "num_ssd_blocks": 1024, "ssd_cache_dir": str(tmp_path_factory.mktemp("depth-ssd"))}


@pytest.fixture(scope="module")
def reference(vllm_run) -> dict:
    return vllm_run("depth", "none", LARGE_KV_MIB, extra=CHUNKS)


@pytest.fixture(scope="module")
def depth(vllm_run, ssd) -> dict:
    return vllm_run("depth", "builtin", cache=ssd, extra=CHUNKS)


def same(a: dict, b: dict) -> None:
    assert b["tokens"] == a["tokens"]
    assert b["logprobs"] == a["logprobs"]


def test_an_aborted_long_prompt_is_stored_chunk_by_chunk(reference, depth) -> None:
    assert depth["stored_before_abort"] == 2 * 256  # both chunks' blocks, ordered as they were computed
    assert depth["prefix_cache_reset"]  # vLLM's own cache is empty: the hit can only be FlexKV's
    assert depth["retry_hit_tokens"] == 2 * 256
    assert depth["retry"]["cached"] == 2 * 256
    same(reference["retry"], depth["retry"])
    assert depth["flexkv"]["failures"] == 0


def test_preempted_requests_resume_from_what_flexkv_stored(reference, depth) -> None:
    assert depth["preemptions"] > 0 and depth["flexkv"]["preemptions"] == depth["preemptions"]
    assert depth["flexkv"]["resumed_hit_tokens"] > 0
    assert [t["tokens"] for t in depth["turns"]] == [t["tokens"] for t in reference["turns"]]


def test_a_prompt_is_keyed_once_per_request(depth) -> None:
    """Keys come from vLLM's block hashes, made once per request and kept from the lookup to the load."""
    counters = depth["flexkv"]
    assert counters["hit_requests"] >= 2
    assert counters["hit_request_keyings"] == counters["hit_requests"]
    assert counters["token_keyings"] == 0  # FlexKV hashed no token id: vLLM had


def test_a_fresh_process_hits_the_whole_shared_prefix_from_ssd_with_layerwise_loads(vllm_run, ssd, reference,
                                                                                    depth) -> None:
    """The batch of the first process ended with generate() returning and the process exiting: what it
    stored is on SSD. The fresh process loads it layer by layer inside the forward."""
    fresh = vllm_run("fresh", "builtin", cache=ssd, extra=(*CHUNKS, "--load-mode", "layerwise"))
    first = fresh["turns"][0]
    assert first["cached"] == PREFIX_TOKENS
    assert fresh["flexkv"]["ssd_hit_tokens"] == PREFIX_TOKENS
    for a, b in zip(reference["fresh"], fresh["turns"]):
        same(a, b)
    assert fresh["flexkv"]["layer_loads"] > 0
    assert fresh["flexkv"]["layer_waits"] >= 2 * fresh["flexkv"]["layer_loads"]  # each of 2 layers waits
    assert fresh["flexkv"]["failures"] == 0
