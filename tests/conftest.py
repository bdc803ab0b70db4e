"""Fixtures shared by the tests: the printed seed, seeded generators, and the manager factory.

- ``seed``: one int per test, printed, so a failure reproduces: rerun with ``FLEXKV_TEST_SEED=<seed>``.
  It is a hash of the test's id unless FLEXKV_TEST_SEED is set (an int, or ``random`` for a fresh one
  per test from os.urandom).
- ``rng`` / ``gen``: numpy and torch generators seeded with it.
- ``make_kv``: started KVManagers with engine fakes (tests/kv_helpers.py); each is checked clean (index
  consistent, no block locked) and shut down after the test.
- ``make_env``: make_kv whose managers start with a reference sequence stored (kv_helpers.RefKVEnv); each
  still running must load it byte-exact after the test (the bad-input tests).
- ``no_flexkv_env``: no FLEXKV_* variable of the tests' own environment (the config tests use it).
- ``vllm_tiny_model`` / ``vllm_run``: a tiny random-weight Llama, and tests/vllm_driver.py run on it in a process
  of its own (one vLLM engine per process), each result computed once per session so tests share engines.

The plain helpers (engine fake, store / load, slots, tokens) are in tests/kv_helpers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kv_helpers import REF_SRC, KVEnv, RefKVEnv, assert_clean, seed_for, start_manager


def pytest_report_header(config: pytest.Config) -> str:
    mode = os.environ.get("FLEXKV_TEST_SEED") or "per test (a hash of its id)"
    return f"flexkv test seed: {mode}; each test prints its own (FLEXKV_TEST_SEED=<seed> reruns it)"


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = seed_for(request.node.nodeid)
    # Printed during setup: pytest shows it with a failing test's captured output.
    print(f"FLEXKV_TEST_SEED={value} reproduces {request.node.nodeid}")
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def make_kv(seed: int, tmp_path: Path) -> Iterator[Callable[..., KVEnv]]:
    """``make_kv(**overrides) -> KVEnv``: a started manager over the default model and cache config
    (kv_helpers.DEFAULT_MODEL / DEFAULT_CACHE, or those of ``config=<file>`` as engines load it) with keyword
    overrides of ModelConfig and CacheConfig keys and KVManager keywords (``ssd_env=FaultInjectingIoEnv(...)``,
    ``ssd_io_engine``, ...), and its engine fake (``engine=`` one of kv_helpers.ENGINE_KINDS,
    ``engine_blocks=``), registered unless ``register=False``.

    ``ssd=True`` turns the SSD tier on in ``<tmp_path>/ssd``; ``ssd=[dirs]`` in those directories. Managers
    of one test get different data (the seed plus their index). At teardown every manager's cache must be
    consistent and hold no lock (also one the test shut down); then each is shut down."""
    created: list[KVEnv] = []

    def factory(*, ssd: bool | list[Any] = False, **overrides: Any) -> KVEnv:
        index = len(created)
        ssd_dirs = None
        if ssd is True:
            ssd_dirs = [tmp_path / "ssd"]
        elif ssd:
            ssd_dirs = list(ssd)
        kv, eng = start_manager(seed=seed + index, ssd_dirs=ssd_dirs, **overrides)
        env = KVEnv(kv, eng, np.random.default_rng(seed + index))
        created.append(env)
        return env

    yield factory
    try:
        for env in created:
            if env.kv.control_plane is not None:  # None only for a manager that joined another's plane and left
                assert_clean(env.kv)
    finally:
        for env in created:
            env.kv.shutdown()


@pytest.fixture
def env(make_kv: Callable[..., KVEnv]) -> KVEnv:
    """A started manager with the defaults and a registered LAYERFIRST engine fake."""
    return make_kv()


@pytest.fixture
def make_env(make_kv: Callable[..., KVEnv]) -> Iterator[Callable[..., RefKVEnv]]:
    """make_kv plus the reference sequence; at teardown each manager still running must be healthy."""
    created: list[RefKVEnv] = []

    def factory(register: bool = True) -> RefKVEnv:
        base = make_kv(register=register)
        env = RefKVEnv(base.kv, base.eng, base.rng)
        created.append(env)
        if register:
            env.ref_tokens = env.tokens(3 * env.tpb + 5)
            env.ref_data = env.put(env.ref_tokens[: 3 * env.tpb], REF_SRC)
        return env

    yield factory
    for env in created:
        if env.kv.is_ready():
            env.assert_healthy()


@pytest.fixture
def no_flexkv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not leak FLEXKV_* overrides into load_config / check_config."""
    for name in list(os.environ):
        if name.startswith("FLEXKV_"):
            monkeypatch.delenv(name)


VLLM_DRIVER = Path(__file__).with_name("vllm_driver.py")
SMALL_KV_MIB = 1.6  # about 50 vLLM blocks of 32 tokens: less than two conversations need
LARGE_KV_MIB = 64


@pytest.fixture(scope="session")
def vllm_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with random weights (logits far from uniform, so wrong KV shows), saved for vLLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(1234)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def vllm_run(vllm_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict]:
    """vllm_run(scenario, connector, kv_mib, cache=dict(...), extra=(...)) -> the driver's JSON result; a
    scenario run once per session with the same arguments is not run again."""
    results: dict = {}
    work = tmp_path_factory.mktemp("vllm-runs")

    def run_driver(scenario: str, connector: str = "builtin", kv_mib: float = SMALL_KV_MIB,
                   cache: dict | None = None, extra: tuple[str, ...] = ()) -> dict:
        key = (scenario, connector, kv_mib, json.dumps(cache, sort_keys=True), extra)
        if key in results:
            return results[key]
        config = work / f"flexkv-{len(results)}.json"
        config.write_text(json.dumps({"cache_config": {"enable_cpu": True, "num_cpu_blocks": 512,
                                                       "tokens_per_block": 32, **(cache or {})}}))
        cmd = [sys.executable, str(VLLM_DRIVER), scenario, "--model", str(vllm_tiny_model), "--config", str(config),
               "--connector", connector, "--kv-cache-mib", str(kv_mib), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
        lines = [line for line in proc.stdout.splitlines() if line.startswith("FLEXKV_RESULT ")]
        assert lines, f"{' '.join(cmd)} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        results[key] = json.loads(lines[-1][len("FLEXKV_RESULT "):])
        results[key]["stderr"] = proc.stderr
        return results[key]

    return run_driver
