"""Real vLLM engines (tests/vllm_engine.py) kept running across the checks of a test module, and what the
vLLM tests compare.

An ``Engine`` is one engine process (with ``tp=2``, plus its two worker processes) in a session of its own,
so that killing it kills its workers too. vLLM's CPU build runs tensor parallelism on this machine with
``VLLM_CPU_OMP_THREADS_BIND='0|1'`` (one core per worker), ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` and
``VLLM_HOST_IP=127.0.0.1``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ENGINE = Path(__file__).with_name("vllm_engine.py")
BLOCK = 32
LOGPROB_TOL = 1e-4  # float32: what two engines (or one, computing a prefix anew) agree to
TAG = "FKV_TEST_TAG"  # in the environment of every process these tests start (and their children)


class Engine:
    def __init__(self, model: Path, log: Path, *, config: Path | None = None, tp: int = 1, kv_mib: float = 64,
                 cores: str = "", max_model_len: int = 1536, tag: str = "") -> None:
        env = tagged_env(tag or f"engine-{os.getpid()}", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_HOST_IP="127.0.0.1",
                         VLLM_CPU_OMP_THREADS_BIND=cores or ("0|1" if tp == 2 else "0-1"))
        cmd = [sys.executable, "-P", str(ENGINE), "--model", str(model), "--tp", str(tp), "--kv-cache-mib",
               str(kv_mib), "--max-model-len", str(max_model_len)]
        if config is not None:
            cmd += ["--config", str(config)]
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115  (closed by close())
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file,
                                     env=env, text=True, start_new_session=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = False

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(("READY", "RESULT ")):
                self._lines.put(line.rstrip("\n"))
            else:
                self._log_file.write(line.encode())
        self._lines.put(None)

    def wait_ready(self, timeout: float = 300.0) -> Engine:
        if not self.ready:
            line = self._next(timeout)
            assert line == "READY", f"the engine did not start: {line!r}\n{self.output()}"
            self.ready = True
        return self

    def _next(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the engine answered nothing within {timeout} s:\n{self.output()}") from None

    def send(self, op: str, **kw: Any) -> None:
        self.wait_ready()
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 300.0) -> Any:
        line = self._next(timeout)
        assert line is not None and line.startswith("RESULT "), f"the engine ended:\n{self.output()}"
        return json.loads(line[len("RESULT "):])

    def generate(self, prompts: list[list[int]], salts: list[str | None] | None = None, max_tokens: int = 12,
                 ) -> list[dict]:
        self.send("generate", prompts=prompts, salts=salts, max_tokens=max_tokens)
        return self.result()

    def has_result(self) -> bool:
        """True once an answer (or the engine's end) is waiting to be read."""
        return not self._lines.empty()

    def stats(self) -> dict:
        self.send("stats")
        return self.result()

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-6000:]

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """Asks the engine to end (EOF on its stdin); close() waits for it."""
        if self.proc.poll() is None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """Ends the engine: EOF on its stdin, then SIGKILL for what is left of its session after a minute."""
        self.stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log_file.close()
        remove_vllm_dist_leftovers(self.log.read_text(errors="replace"))


def remove_vllm_dist_leftovers(log: str) -> None:
    """Removes what vLLM's CPU backend leaves of a tensor-parallel engine that has ended (its workers' shared
    memory ``/dev/shm/vllm_dist_<id>-...-cpushm_<rank>``, 4 MiB each, and its rendezvous file
    ``/tmp/vllm_dist_<id>``): vLLM leaks them even when it shuts down cleanly. ``log``: the engine's output,
    which names its ``distributed_init_method``; only that engine's ids are touched."""
    for ident in set(re.findall(r"distributed_init_method=file://\S*/(vllm_dist_[0-9a-f]+)", log)):
        for leftover in [*Path("/dev/shm").glob(f"{ident}-*"), Path(tempfile.gettempdir()) / ident]:
            leftover.unlink(missing_ok=True)


def random_prompt(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(5, 1000, size=n).tolist()


def assert_same(reference: list[dict], got: list[dict], tol: float = LOGPROB_TOL) -> None:
    """Greedy tokens identical; logprobs equal to ``tol``."""
    assert len(reference) == len(got)
    for i, (a, b) in enumerate(zip(reference, got)):
        assert b["tokens"] == a["tokens"], f"output {i}: tokens differ: {a['tokens']} vs {b['tokens']}"
        worst = float(np.max(np.abs(np.subtract(a["logprobs"], b["logprobs"])))) if a["logprobs"] else 0.0
        assert worst <= tol, f"output {i}: logprobs differ by {worst}"


def tagged_env(tag: str, **extra: str) -> dict[str, str]:
    """This environment without FLEXKV_* overrides, with ``TAG=tag``: processes_tagged finds what inherits it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXKV_")}
    return {**env, TAG: tag, **extra}


def processes_tagged(tag: str) -> list[str]:
    """'pid: command line' of every live process whose environment has ``TAG=tag``."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            state = (d / "stat").read_text().rsplit(")", 1)[-1].split()[0]
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in environ and state != "Z":  # a zombie is gone, only not yet collected
            found.append(f"{d.name}: {cmdline}")
    return found


def shm_names() -> set[str]:
    """Names in /dev/shm that are FlexKV's."""
    return {p.name for p in Path("/dev/shm").iterdir() if "flexkv" in p.name.lower()}


def wait_until(check: Any, timeout: float, what: str) -> float:
    """Polls ``check()`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what} within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def wait_http_up(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Until ``url`` answers (an OpenAI server that has loaded its model); fails with the log's tail if
    ``proc`` exits or ``timeout`` s pass first."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the OpenAI server exited:\n{log.read_text(errors='replace')[-6000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, (f"the OpenAI server did not answer {url} within {timeout} s:\n"
                                                 f"{log.read_text(errors='replace')[-6000:]}")
            time.sleep(0.5)


def post_completion(base_url: str, body: dict, timeout: float = 120.0) -> dict:
    """An OpenAI server's answer (parsed JSON) to ``body`` posted at ``base_url``/v1/completions."""
    import json
    import urllib.request

    req = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())
