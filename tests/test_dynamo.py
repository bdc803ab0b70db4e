"""NVIDIA Dynamo 1.6.1's KV router steered by FlexKV's tiers: the real frontend (``--router-mode kv``) and two real
``dynamo.vllm`` workers (vLLM 0.31's CPU build) with FlexKV, started once for the module (tests/dynamo_helpers.py).

A prompt is computed on worker A; pinned fillers evict it from A's vLLM cache while FlexKV keeps it in A's CPU
tier; the next request for it, routed by the router, goes to A with host blocks credited, and answers as the
first computation did. More fillers push it from the CPU tier to the SSD tier (disk blocks credited), then out
of FlexKV (no credit). The same with the workers' roles swapped. The test runs in the suite's environment; the
deployment's processes run in the Dynamo environment (``.venv-dynamo``, made by ``./build.sh --dev``;
``FLEXKV_DYNAMO_PYTHON`` names another interpreter).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from dynamo_helpers import BLOCK, Deployment, dynamo_python, flexkv_config

PROMPT_BLOCKS = 10
FILLER_TOKENS = 14 * BLOCK  # a filler takes 14 of a worker's 32 vLLM blocks


@pytest.fixture(scope="module")
def deployment(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("dynamo")
    config = flexkv_config(root, num_cpu_blocks=64, ssd_blocks=160)
    port = 18000 + os.getpid() % 1000
    d = Deployment(dynamo_python(), tiny_chat_model, root, config=config, http_port=port)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def prompt(seed: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 1000 + 6 for i in range(PROMPT_BLOCKS * BLOCK + 5)]


def fill(d: Deployment, worker: int, first: int, n: int) -> int:
    for k in range(first, first + n):
        d.complete([(k * 17 + 13 * i) % 1000 + 6 for i in range(FILLER_TOKENS)], max_tokens=1, worker=worker)
    return first + n


@pytest.mark.parametrize("holder", [0, 1], ids=["worker-a", "worker-b"])
def test_the_router_follows_flexkv_tiers(deployment: Deployment, holder: int) -> None:
    d = deployment
    ids = d.worker_ids()
    worker = ids[holder]
    p = prompt(100 + holder)
    first = d.complete(p, worker=worker)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    k = fill(d, worker, 1000 * (holder + 1), 3)  # evicted from vLLM's 32 blocks, still in FlexKV's 64 CPU blocks
    d.settle()
    again = d.complete(p)
    sel = d.selection(again)
    assert sel["worker_id"] == worker, sel
    assert sel["host_pinned_blocks"] == PROMPT_BLOCKS, sel  # credited from FlexKV's CPU tier
    assert again["choices"][0]["text"] == first["choices"][0]["text"]  # loaded KV answers as computed KV did
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == PROMPT_BLOCKS * BLOCK

    k = fill(d, worker, k, 5)  # out of the CPU tier, on SSD
    d.settle()
    on_ssd = d.complete(p)
    sel = d.selection(on_ssd)
    assert sel["worker_id"] == worker, sel
    assert sel["host_pinned_blocks"] == 0 and sel["disk_blocks"] == PROMPT_BLOCKS, sel
    assert on_ssd["choices"][0]["text"] == first["choices"][0]["text"]

    fill(d, worker, k, 24)  # 336 blocks through the SSD tier's 160 (LRU): FlexKV holds nothing of it
    d.settle()
    gone = d.complete(p)
    sel = d.selection(gone)
    assert sel["host_pinned_blocks"] == 0 and sel["disk_blocks"] == 0, sel
