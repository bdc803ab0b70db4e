"""The vLLM connector in depth, under real vLLM (its CPU build), in three engine processes shared by the tests:

- vLLM alone, with a KV cache that keeps everything (the reference);
- FlexKV (asynchronous loads, SSD tier; copies seen done 4 steps late, as slow GPU copies would be:
  tests/vllm_fault_connector.py) with a small KV cache and prefill chunks of 256 tokens: a long prompt
  aborted after its second chunk is resubmitted once vLLM's own prefix cache is emptied, then a batch whose
  prompts share a 640-token prefix makes vLLM preempt; then a prompt's first three chunks are computed and
  the process exits with that request running and its copies in flight, without shutting vLLM down;
- a fresh process with layer-wise loads, whose requests continue the batch's and repeat the unfinished
  prompt: every whole block computed before must come from SSD.

Greedy tokens and logprobs must equal vLLM alone's (for the preempted batch, tokens: a request recomputed
after preemption runs in other batches, which moves the last bits of its logprobs with or without FlexKV).
"""

from __future__ import annotations

import json

import pytest

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

from conftest import LARGE_KV_MIB

CHUNKS = ("--max-batched-tokens", "256")
BATCH_BLOCKS = 24  # 736-token prompts, 33 tokens out: the 24th block is filled by each request's last step
UNFINISHED_BLOCKS = 21  # a 700-token prompt's whole blocks, computed in three chunks before the exit


@pytest.fixture(scope="module")
def ssd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"enable_ssd": True, "num_ssd_blocks": 1024, "ssd_cache_dir": str(tmp_path_factory.mktemp("depth-ssd"))}


@pytest.fixture(scope="module")
def reference(vllm_run) -> dict:
    return vllm_run("depth", "none", LARGE_KV_MIB, extra=CHUNKS)


@pytest.fixture(scope="module")
def depth(vllm_run, ssd) -> dict:
    return vllm_run("depth", "module", cache=ssd, extra=(*CHUNKS, "--late-reports"))


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


def test_a_fresh_process_hits_every_block_of_an_offline_batch_from_ssd(vllm_run, ssd, reference, depth,
                                                                       tmp_path) -> None:
    """generate() returns once the batch's copies are done (vLLM's engine keeps stepping while FlexKV has
    stores in flight); a process that exits with copies in flight keeps them (flushed at exit, written
    through to SSD). The fresh process (layer-wise loads inside the forward) hits every whole block."""
    assert depth["stores_in_flight_after_generate"] == 0
    assert depth["stores_in_flight_at_exit"] > 0
    assert f"{depth['stores_in_flight_at_exit']} store copies in flight were kept, 0 dropped" in depth["stderr"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(reference["fresh_prompts"]))
    fresh = vllm_run("fresh", "builtin", cache=ssd, extra=(*CHUNKS, "--load-mode", "layerwise", "--prompts",
                                                           str(prompts)))
    expected = [(len(p) - 1) // 32 * 32 for p in reference["fresh_prompts"]]  # every whole block vLLM asks for
    assert expected[0] == BATCH_BLOCKS * 32 and expected[-1] == UNFINISHED_BLOCKS * 32
    assert [t["cached"] for t in fresh["turns"]] == expected
    assert fresh["flexkv"]["ssd_hit_tokens"] >= (BATCH_BLOCKS + UNFINISHED_BLOCKS) * 32
    for a, b in zip(reference["fresh"], fresh["turns"]):
        same(a, b)
    assert fresh["flexkv"]["layer_loads"] > 0
    assert fresh["flexkv"]["layer_waits"] >= 2  # both layers of a forward waited for their own layer
    assert fresh["flexkv"]["failures"] == 0
