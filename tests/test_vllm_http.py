"""FlexKV under vLLM's OpenAI-compatible HTTP server, as users run it (vLLM 0.32's CPU build, whose working
entry point is ``python -m vllm.entrypoints.openai.api_server``; docs/vllm.md): a multi-turn streaming chat
with FlexKV hits on later turns and the same answers as recomputing, and vLLM's ``/metrics`` scraped over
HTTP showing FlexKV's hit tokens, tier usage and load latency, equal to what FlexKV's own endpoint (the
engine process's in-process manager with ``metrics_port``) and vLLM's own connector-hit counter say; last,
the server stopped with SIGTERM right after an answer, and a fresh engine process finding that answer's
blocks on SSD.

One server serves every check (module fixture): a tiny random-weight Llama with a one-word-per-token
tokenizer (conftest ``tiny_chat_model``) and a vLLM KV cache so small that two conversations evict each
other, so later turns hit FlexKV.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e

from vllm_helpers import post_completion, wait_http_up

from kv_helpers import free_tcp_port

SMALL_KV_BYTES = int(1.6 * 2**20)  # about 50 vLLM blocks of 32 tokens: less than two conversations need


class Server:
    def __init__(self, url: str, flexkv_metrics: str, log: Path, model: str, proc: subprocess.Popen,
                 ssd: dict[str, Any]) -> None:
        self.url, self.flexkv_metrics, self.log, self.model = url, flexkv_metrics, log, model
        self.proc, self.ssd = proc, ssd

    def complete(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The greedy answer's token ids to a prompt of token ids (/v1/completions)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "return_token_ids": True}
        return post_completion(self.url, body, timeout=300)["choices"][0]["token_ids"]

    def chat(self, messages: list[dict[str, str]], *, stream: bool, salt: str | None = None) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": 12, "temperature": 0,
                                "stream": stream, "ignore_eos": True}
        if salt:
            body["cache_salt"] = salt
        req = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            if not stream:
                return json.loads(r.read())["choices"][0]["message"]["content"]
            parts = []
            for raw in r:  # server-sent events: "data: {...}" lines, then "data: [DONE]"
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                parts.append(delta.get("content") or "")
            return "".join(parts)


@pytest.fixture(scope="module")
def server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("vllm-http")
    port, metrics_port = free_tcp_port(), free_tcp_port()
    config = work / "flexkv.json"
    ssd = {"enable_ssd": True, "num_ssd_blocks": 1024, "ssd_cache_dir": str(work / "ssd")}
    config.write_text(json.dumps({"cache_config": {"enable_cpu": True, "num_cpu_blocks": 512, "tokens_per_block": 32,
                                                   **ssd},
                                  "metrics_port": metrics_port, "num_log_interval_requests": 4}))
    ktc = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
           "kv_connector_module_path": "flexkv.adapters.vllm"}  # the module path: vLLM finds the metrics hooks
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_chat_model),
           "--host", "127.0.0.1", "--port", str(port), "--block-size", "32", "--max-model-len", "1536",
           "--dtype", "bfloat16", "--enforce-eager", "--kv-cache-memory-bytes", str(SMALL_KV_BYTES),
           "--max-num-seqs", "4", "--seed", "0", "--kv-transfer-config", json.dumps(ktc)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_")}
    env.update(FLEXKV_CONFIG_PATH=str(config), VLLM_CPU_NUM_OF_RESERVED_CPU="1", VLLM_LOG_STATS_INTERVAL="2")
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_up(proc, f"{url}/health", log, 600)
        yield Server(url, f"http://127.0.0.1:{metrics_port}/metrics", log, str(tiny_chat_model), proc, ssd)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(6, 1024, size=n))


@pytest.fixture(scope="module")
def chat_run(server: Server) -> dict[str, Any]:
    """Two conversations of three turns, interleaved; each turn streamed, and recomputed under a fresh
    cache_salt (no hit anywhere) for reference; vLLM's connector-hit counter read around each turn."""
    from prometheus_client.parser import text_string_to_metric_families

    def external_hits() -> float:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "vllm:external_prefix_cache_hits_total")

    rng = np.random.default_rng(17)
    history: dict[int, list[dict[str, str]]] = {1: [], 2: []}
    turns = []
    for turn in range(3):
        for conv in (1, 2):
            messages = [*history[conv], {"role": "user", "content": words(rng, 700 if turn == 0 else 150)}]
            before = external_hits()
            answer = server.chat(messages, stream=True)
            hits = external_hits() - before
            reference = server.chat(messages, stream=False, salt=f"reference-{conv}-{turn}")
            turns.append({"turn": turn, "answer": answer, "reference": reference, "hits": hits})
            history[conv] = [*messages, {"role": "assistant", "content": answer}]
    return {"turns": turns}


def test_streaming_chat_hits_flexkv_on_later_turns_with_the_same_answers(chat_run: dict[str, Any]) -> None:
    for t in chat_run["turns"]:
        assert t["answer"].split() == t["reference"].split(), t
        assert len(t["answer"].split()) == 12
    assert all(t["hits"] == 0 for t in chat_run["turns"] if t["turn"] == 0)
    assert all(t["hits"] > 0 for t in chat_run["turns"] if t["turn"] > 0), chat_run["turns"]


def test_vllm_metrics_show_flexkv_consistent_with_its_own_counters(server: Server, chat_run: dict[str, Any],
                                                                   scrape) -> None:
    # Stats reach vLLM's logger with each engine step: a short request (under one block, another salt: no hit,
    # nothing stored) makes one more step after the chat's last stores.
    deadline = time.monotonic() + 60
    while True:
        server.chat([{"role": "user", "content": "w6 w7"}], stream=False, salt=f"nudge-{time.monotonic()}")
        got, own = scrape(f"{server.url}/metrics", "vllm:"), scrape(server.flexkv_metrics)
        pairs = [(("vllm:flexkv_tier_hit_tokens_total", (("tier", "cpu"),)),
                  ("flexkv_tier_hit_tokens_total", (("tier", "cpu"),))),
                 (("vllm:flexkv_tier_used_blocks", (("tier", "cpu"),)),
                  ("flexkv_tier_used_blocks", (("tier", "cpu"),))),
                 (("vllm:flexkv_latency_seconds_count", (("op", "load"),)),
                  ("flexkv_latency_seconds_count", (("op", "load"),))),
                 (("vllm:flexkv_stored_tokens_total", ()), ("flexkv_stored_tokens_total", ()))]
        if all(got.get(a) == own.get(b) for a, b in pairs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for a, b in pairs:
        assert got.get(a) == own.get(b), (a, got.get(a), own.get(b))
    hit_tokens = got[("vllm:flexkv_tier_hit_tokens_total", (("tier", "cpu"),))]
    assert hit_tokens > 0 and hit_tokens % 32 == 0
    assert got[("vllm:flexkv_tier_used_blocks", (("tier", "cpu"),))] > 0
    assert got[("vllm:flexkv_tier_capacity_blocks", (("tier", "cpu"),))] == 512
    loads = got[("vllm:flexkv_latency_seconds_count", (("op", "load"),))]
    assert loads >= 4  # every later turn loaded
    assert got[("vllm:flexkv_latency_seconds_bucket", (("le", "+Inf"), ("op", "load")))] == loads
    # The connector's own count of the tokens it had vLLM load is vLLM's count of connector hits, and FlexKV's.
    external = got[("vllm:external_prefix_cache_hits_total", ())]
    assert got[("vllm:flexkv_connector_hit_tokens_total", ())] == external == hit_tokens
    assert sum(t["hits"] for t in chat_run["turns"]) <= external
    assert got.get(("vllm:flexkv_connector_failures_total", ()), 0) == 0
    assert got[("vllm:flexkv_transfer_bytes_total", (("dst", "engine"), ("src", "cpu")))] > 0
    assert got[("vllm:prompt_tokens_cached_by_source_total", (("source", "host"),))] == external
    log = server.log.read_text(errors="replace")
    assert "FlexKV: " in log and " gets, " in log and "hit rate" in log  # the periodic line
    # vLLM's own stats line (every VLLM_LOG_STATS_INTERVAL s, once a step has run since), through
    # FlexKVConnectorStats.reduce(); a loaded machine may need a few intervals
    deadline = time.monotonic() + 30
    while "KV Transfer metrics: flexkv_hit_rate=" not in log and time.monotonic() < deadline:
        time.sleep(1)
        log = server.log.read_text(errors="replace")
    assert "KV Transfer metrics: flexkv_hit_rate=" in log and "flexkv_used_blocks_cpu=" in log


def test_sigterm_right_after_an_answer_keeps_its_blocks_for_a_fresh_process(server: Server, chat_run: dict[str, Any],
                                                                             vllm_run, seed: int,
                                                                             tmp_path: Path) -> None:
    """`vllm serve` stopped with SIGTERM as soon as an answer is back (its stores may still be in flight): it
    exits in bounded time, and what it stored is on SSD before it does. A fresh engine process (offline, the
    same model and FlexKV config) hits every whole block of that prompt from SSD and answers the same.
    The last test of this module: it stops the module's server."""
    prompt = np.random.default_rng(seed).integers(6, 1024, size=20 * 32 + 5).tolist()
    answer = server.complete(prompt, max_tokens=12)  # 12: the driver's max_tokens
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(120)
    stopped_s = time.monotonic() - t0
    assert stopped_s < 45, f"vllm serve took {stopped_s:.0f} s to stop after SIGTERM"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([prompt]))
    fresh = vllm_run("fresh", "builtin", cache=server.ssd, extra=("--prompts", str(prompts)), model=Path(server.model))
    assert [t["cached"] for t in fresh["turns"]] == [20 * 32]
    assert fresh["flexkv"]["ssd_hit_tokens"] >= 20 * 32  # its CPU tier started empty
    assert fresh["turns"][0]["tokens"] == answer
    assert fresh["flexkv"]["failures"] == 0
