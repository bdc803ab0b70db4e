"""FlexKV under real vLLM (vLLM 0.32's CPU build): greedy outputs with FlexKV equal those without it.

Each scenario runs tests/vllm_driver.py in its own process: a tiny Llama with random weights (made here
with transformers, so logits are far from uniform and wrong KV shows), prompts as token ids, greedy
sampling with logprobs. The reference run uses vLLM alone with a KV cache large enough to keep every
prefix; the FlexKV run gets a KV cache so small that vLLM evicts and preempts, so its hits come from
FlexKV. Outputs must be identical, token for token and logprob for logprob.
"""

from __future__ import annotations

import shutil

import pytest

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

from conftest import LARGE_KV_MIB


def assert_same_outputs(reference: dict, got: dict) -> None:
    assert len(reference["turns"]) == len(got["turns"])
    for i, (a, b) in enumerate(zip(reference["turns"], got["turns"])):
        assert b["tokens"] == a["tokens"], f"turn {i}: tokens differ"
        assert b["logprobs"] == a["logprobs"], f"turn {i}: logprobs differ"


@pytest.mark.parametrize("store_mode", ["computed", "finished"])
def test_multi_turn_chat_matches_vllm_alone_and_hits_flexkv(vllm_run, store_mode: str) -> None:
    """Both store modes (kv_connector_extra_config flexkv_store_mode): blocks stored as they are computed, or
    all of a request's when it finishes."""
    reference = vllm_run("chat", "none", LARGE_KV_MIB)
    got = vllm_run("chat", "builtin", extra=() if store_mode == "computed" else ("--store-mode", store_mode))
    assert_same_outputs(reference, got)
    assert got["flexkv"]["hit_tokens"] > 0, got["flexkv"]  # vLLM evicted, FlexKV served
    assert got["flexkv"]["failures"] == 0
    for a, b in zip(reference["turns"], got["turns"]):  # later turns: only the new tokens are computed
        assert b["cached"] == a["cached"]
    assert any(t["cached"] > 0 for t in got["turns"])
    orders, requests = got["flexkv"]["store_orders"], len(got["turns"])
    if store_mode == "finished":
        assert orders == requests, orders  # one copy per request, when it ends
    else:
        assert orders > requests, orders  # a request's prompt blocks after its prefill, then what its decode filled


def test_async_scheduling_matches_vllm_alone_and_hits_flexkv(vllm_run) -> None:
    """vLLM's async scheduling (its scheduler a step ahead of the worker; the CPU build turns it off, the driver
    turns it back on): the same outputs and hits as without it."""
    reference = vllm_run("chat", "none", LARGE_KV_MIB)
    got = vllm_run("chat", "builtin", extra=("--async-scheduling",))
    assert got["async_scheduling"] and not reference["async_scheduling"]
    assert_same_outputs(reference, got)
    assert got["flexkv"]["hit_tokens"] > 0 and got["flexkv"]["failures"] == 0
    assert [t["cached"] for t in got["turns"]] == [t["cached"] for t in reference["turns"]]


def test_preempted_requests_resume_with_the_same_outputs(vllm_run) -> None:
    reference = vllm_run("batch", "none", LARGE_KV_MIB)
    got = vllm_run("batch", "builtin")
    assert got["preemptions"] > 0, "the scenario should make vLLM preempt requests"
    for a, b in zip(reference["turns"], got["turns"]):
        assert b["tokens"] == a["tokens"]
    assert got["flexkv"]["hit_tokens"] > 0 and got["flexkv"]["failures"] == 0


def test_blocks_lost_after_the_lookup_are_recomputed(vllm_run) -> None:
    """A block the lookup promised but the load cannot deliver is reported to vLLM, which recomputes it
    (kv_load_failure_policy=recompute): outputs stay exact."""
    reference = vllm_run("chat", "none", LARGE_KV_MIB)
    got = vllm_run("chat", "module", extra=("--drop-last-block",))  # the fault comes in as the engine's connector
    assert_same_outputs(reference, got)
    assert got["flexkv"]["failures"] > 0, got["flexkv"]


def test_cache_salts_never_share_blocks(vllm_run) -> None:
    got = vllm_run("salts", "builtin")
    first, other_salt, same_salt = got["turns"]
    assert first["cached"] == 0
    assert other_salt["cached"] == 0  # the same prompt under another cache_salt: no hit, not even from FlexKV
    assert same_salt["cached"] > 0
    assert other_salt["tokens"] == first["tokens"]


def test_a_fresh_engine_process_hits_what_an_earlier_one_stored_on_ssd(vllm_run, tmp_path) -> None:
    """The module-path connector in vLLM's default multi-process engine stores a prompt (through to SSD);
    a new engine process with the built-in connector loads it from SSD."""
    ssd = {"enable_ssd": True, "num_ssd_blocks": 1024, "ssd_cache_dir": str(tmp_path / "ssd")}
    reference = vllm_run("prefix", "none", LARGE_KV_MIB)
    first = vllm_run("prefix", "module", cache=ssd, extra=("--multiprocessing",))
    assert first["turns"][0]["cached"] == 0
    fresh = vllm_run("prefix", "builtin", cache=ssd)
    assert fresh["turns"][0]["cached"] == reference["turns"][1]["cached"] > 0
    assert fresh["flexkv"]["ssd_hit_tokens"] > 0
    assert fresh["turns"][0]["tokens"] == reference["turns"][1]["tokens"]
    # The KV bytes come from the first process, whose engine ran its worker in a process of its own (other
    # CPU threads, so other rounding in the last bits): its own second answer, from its own prefix cache,
    # is the exact reference.
    assert fresh["turns"][0]["logprobs"] == first["turns"][1]["logprobs"]


def test_corrupted_ssd_blocks_are_recomputed(vllm_run, tmp_path) -> None:
    """Blocks whose bytes on SSD were damaged fail their checksum when a fresh engine brings them up: they
    are misses, counted, and vLLM computes those tokens itself; the answer is the same."""
    ssd_dir = tmp_path / "ssd"
    first = vllm_run("prefix", "builtin",
                     cache={"enable_ssd": True, "num_ssd_blocks": 1024, "ssd_cache_dir": str(ssd_dir)})
    assert first["flexkv"]["stored_tokens"] > 0
    damaged = tmp_path / "damaged"
    shutil.copytree(ssd_dir, damaged)
    slot = 36 * 1024  # one 32 KiB block of this model plus its 4 KiB header
    for data in damaged.rglob("blocks-*.dat"):
        with open(data, "r+b") as f:
            for i in range(5, 25):  # one byte inside the KV bytes of most stored blocks
                f.seek(i * slot + 4096 + 1000)
                byte = f.read(1)
                f.seek(i * slot + 4096 + 1000)
                f.write(bytes([byte[0] ^ 0xFF]))
    fresh = vllm_run("prefix", "builtin", cache={"enable_ssd": True, "num_ssd_blocks": 1024,
                                            "ssd_cache_dir": str(damaged)})
    assert fresh["flexkv"]["ssd_mismatch_blocks"] > 0, fresh["flexkv"]
    assert fresh["turns"][0]["cached"] < first["turns"][1]["cached"]
    assert fresh["turns"][0]["tokens"] == first["turns"][1]["tokens"]


def test_reset_prefix_cache_with_reset_connector_leaves_no_stale_flexkv_hit(vllm_run) -> None:
    """After ``llm.reset_prefix_cache(reset_connector=True)`` (what RL trainers call after a weight update) the
    prompt stored before is computed again: FlexKV serves nothing of it. Without reset_connector, FlexKV still
    serves it (the control that shows the blocks were there)."""
    kept = vllm_run("reset", "module", LARGE_KV_MIB, extra=("--keep-connector-cache",))
    assert kept["reset_ok"] and kept["hits_after_reset"] > 0 and kept["turns"][1]["cached"] > 0
    reset = vllm_run("reset", "module", LARGE_KV_MIB)
    assert reset["reset_ok"]
    assert reset["hits_after_reset"] == 0 and reset["turns"][1]["cached"] == 0
    assert reset["turns"][1]["tokens"] == reset["turns"][0]["tokens"]


def test_a_conversation_begun_on_one_node_continues_on_another_from_the_remote_tier(vllm_run, remote, tmp_path) -> None:
    """Node A (an engine process with its own CPU tier) runs two turns of two conversations, its blocks written
    through to the remote tier (S3 on SeaweedFS, the index in Redis); node B, another engine process with an
    empty CPU tier, continues both with the third turn: its prompts hit A's blocks in the remote tier, and
    every output equals vLLM alone."""
    reference = vllm_run("chat", "none", LARGE_KV_MIB)
    cache = {"num_cpu_blocks": 256, **remote.cache()}
    state = str(tmp_path / "conversations.json")
    a = vllm_run("handoff", "builtin", cache=cache, extra=("--part", "a", "--state", state))
    assert a["flexkv"]["remote_written_blocks"] > 0
    b = vllm_run("handoff", "builtin", cache=cache, extra=("--part", "b", "--state", state))
    assert_same_outputs(reference, {"turns": a["turns"] + b["turns"]})
    assert b["flexkv"]["remote_hit_blocks"] > 0 and b["flexkv"]["hit_tokens"] > 0
    assert b["flexkv"]["failures"] == 0 and b["flexkv"]["remote_mismatch_blocks"] == 0
