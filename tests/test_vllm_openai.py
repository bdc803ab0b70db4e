"""vLLM's OpenAI server (`vllm serve`; on the CPU build `python -m vllm.entrypoints.openai.api_server`, whose
`vllm` command cannot find its distribution) with FlexKV, tensor parallelism 2, and FlexKV's embedded server
(the engine process starts `flexkv serve` as its child): Ctrl-C, with vLLM's default shutdown (which kills its
engine process and that one's children without waiting), leaves no process of theirs running and nothing of
FlexKV's in /dev/shm (the CPU tier is a memfd: the kernel frees it with its last user).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from vllm_helpers import (
    BLOCK,
    post_completion,
    processes_tagged,
    random_prompt,
    remove_vllm_dist_leftovers,
    shm_names,
    tagged_env,
    wait_http_up,
)

from flexkv.core.remote_plane import query_stats

from kv_helpers import free_tcp_port

try:
    import vllm  # noqa: F401  (installed by `./build.sh --dev`; these tests must run, never skip)
except ImportError as e:
    raise ImportError("the vLLM end-to-end tests need vLLM's CPU build: run ./build.sh --dev") from e


def test_openai_server_stopped_by_ctrl_c_leaves_nothing_behind(tiny_model: Path, seed: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="fkv-", dir="/tmp"))  # short: ipc:// paths are limited to 107 bytes
    endpoint = f"ipc://{work}/flexkv"
    config = work / "flexkv.json"
    config.write_text(json.dumps({"server_recv_port": endpoint, "server_client_mode": True,
                                  "server_launch_mode": "embedded",
                                  "cache_config": {"enable_cpu": True, "num_cpu_blocks": 128,
                                                   "tokens_per_block": BLOCK}}))
    tag = f"openai-{work.name}"
    port = free_tcp_port()
    log = work / "server.log"
    shm_before = shm_names()
    env = tagged_env(tag, FLEXKV_CONFIG_PATH=str(config), VLLM_CPU_OMP_THREADS_BIND="0|1",
                     VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_HOST_IP="127.0.0.1")
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--skip-tokenizer-init", "--tensor-parallel-size", "2", "--dtype", "float32", "--block-size", str(BLOCK),
           "--max-model-len", "1024", "--enforce-eager", "--kv-cache-memory-bytes", str(4 * 2**20), "--port",
           str(port), "--kv-transfer-config",
           '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both","kv_load_failure_policy":"recompute"}']
    with open(log, "wb") as out:  # its own process group, as a shell's foreground job: Ctrl-C signals all of it
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http_up(proc, f"http://127.0.0.1:{port}/v1/models", log, 400)
        prompt = random_prompt(np.random.default_rng(seed), 6 * BLOCK + 9)
        body = {"model": str(tiny_model), "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "return_token_ids": True}
        first = post_completion(f"http://127.0.0.1:{port}", body)["choices"][0]["token_ids"]
        assert len(first) == 8
        t0 = time.monotonic()  # the answer's blocks reach FlexKV's server
        while query_stats(endpoint)["counters"]["put_new_blocks"] < 6:
            assert time.monotonic() - t0 < 30, query_stats(endpoint)
            time.sleep(0.1)
        assert post_completion(f"http://127.0.0.1:{port}", body)["choices"][0]["token_ids"] == first
        running = processes_tagged(tag)
        assert any("flexkv.core.serve_cmd" in p for p in running), running  # the embedded server

        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets SIGINT
        proc.wait(120)
        t0 = time.monotonic()
        while processes_tagged(tag):
            assert time.monotonic() - t0 < 30, processes_tagged(tag)
            time.sleep(0.1)
        assert shm_names() - shm_before == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in processes_tagged(tag):  # a process that outlived its group (the test failed): not left running
            os.kill(int(p.split(":")[0]), signal.SIGKILL)
        remove_vllm_dist_leftovers(log.read_text(errors="replace"))
        shutil.rmtree(work, ignore_errors=True)
