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
- ``run_ranks``: runs a rank script (tests/sglang_tp_rank.py, tests/trtllm_tp_rank.py) as N processes at once
  and parses their ``PASS <check> rank<r>`` / ``FAIL ...`` lines (the tensor-parallel engine tests).
- ``tiny_model``: a tiny Llama with random weights (bfloat16) saved for the real-vLLM tests, once a session.
- ``flexkv_log``: the records logged on the ``flexkv`` logger during the test.
- ``original_kv``: managers built and fed as the original FlexKV's users do (tests/upstream_helpers.py), checked
  clean and shut down after the test; ``upstream_warnings``: the original's no-effect keys warn afresh.
- ``remote_servers``: SeaweedFS (S3) and Redis on 127.0.0.1, started once per session (tests/remote_servers.py);
  ``remote``: those servers up, the AWS environment pointing at them, and a bucket prefix of the test's own.
- ``vllm_run``: tests/vllm_driver.py run on tiny_model in a process
  of its own (one vLLM engine per process), each result computed once per session so tests share engines.

The plain helpers (engine fake, store / load, slots, tokens) are in tests/kv_helpers.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from remote_servers import ACCESS_KEY, BUCKET, SECRET_KEY, Servers
from upstream_helpers import OriginalEngine, start_original

from kv_helpers import REF_SRC, KVEnv, RefKVEnv, assert_clean, free_tcp_port, seed_for, start_manager


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


@pytest.fixture(scope="module")
def run_ranks() -> Callable[..., dict[str, Any]]:
    """``run_ranks(script, work, seed, ranks=2, timeout=240, env=None) -> {"lines", "codes", "output"}``: starts
    ``python tests/<script> <work> <rank> <seed>`` for every rank at once (``OMPI_COMM_WORLD_RANK`` set to the
    rank, as an MPI launcher does), waits for all (a rank still running at the timeout is killed), and maps
    (check, rank) to that rank's PASS or FAIL line; ``output`` holds every rank's log tail."""

    def run(script: str, work: Path, seed: int, ranks: int = 2, timeout: float = 240.0,
            env: dict[str, str] | None = None) -> dict[str, Any]:
        logs = [work / f"rank{r}.log" for r in range(ranks)]
        procs = []
        for r, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, str(Path(__file__).parent / script), str(work),
                                               str(r), str(seed)], stdout=out, stderr=subprocess.STDOUT,
                                              cwd=str(work), env={**os.environ, **(env or {}),
                                                                  "OMPI_COMM_WORLD_RANK": str(r)}))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a hung rank: its log still tells which check hung
                p.kill()
                p.wait()
        outputs = [log.read_text() for log in logs]
        lines = {}
        for out in outputs:
            for line in out.splitlines():
                status, _, rest = line.partition(" ")
                if status in ("PASS", "FAIL"):
                    name, _, who = rest.partition(" ")
                    lines[(name, int(who.split(":")[0].removeprefix("rank")))] = line
        return {"lines": lines, "codes": [p.returncode for p in procs],
                "output": "\n".join(f"--- rank {r}\n{o[-6000:]}" for r, o in enumerate(outputs))}

    return run


@pytest.fixture
def free_port() -> Callable[[], int]:
    """free_port() -> a TCP port nothing listens on now (for metrics endpoints)."""
    return free_tcp_port


@pytest.fixture
def scrape() -> Callable[..., dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """scrape(url, prefix="flexkv") -> {(sample name, sorted labels without model/engine): value}, read over
    HTTP and parsed with prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def read(url: str, prefix: str = "flexkv") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith(prefix):
                    labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "engine")))
                    out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
        return out

    return read


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with random weights (the vLLM tests): logits far from uniform, so wrong KV shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(1234)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def original_kv(tmp_path: Path) -> Iterator[Callable[..., tuple[Any, OriginalEngine]]]:
    """``original_kv(layout_kind, model={...}, cache={...})``: a started manager built from the original FlexKV's
    constructor arguments, with its engine (one of upstream_helpers.LAYOUTS) registered through KVTPClient."""
    created: list[Any] = []

    def factory(layout_kind: str = "layerfirst", model: dict[str, Any] | None = None,
                cache: dict[str, Any] | None = None, num_blocks: int = 64) -> tuple[Any, OriginalEngine]:
        kv, eng = start_original(layout_kind, model or {}, cache or {}, tmp_path / f"ssd{len(created)}", num_blocks)
        created.append(kv)
        return kv, eng

    yield factory
    try:
        for kv in created:
            if kv.control_plane is not None and not kv.control_plane.closed:
                assert_clean(kv)
    finally:
        for kv in created:
            kv.shutdown()


@pytest.fixture
def upstream_warnings() -> Iterator[None]:
    """The original FlexKV's keys without effect are warned about once per process: afresh for this test."""
    from flexkv.core import upstream

    upstream.reset_warnings()
    yield
    upstream.reset_warnings()


@pytest.fixture
def flexkv_log() -> Iterator[list[logging.LogRecord]]:
    """Records logged on the "flexkv" logger (a handler on the logger itself, whatever its propagation)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("flexkv")
    handler = _Keep(level=logging.DEBUG)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_model with a tokenizer and chat template, for vLLM's OpenAI server: one word ("w<id>") per token id,
    so an answer's text encodes back to the same ids in the next turn's prompt."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    vocab = {"<unk>": 0, "</s>": 1, "user": 2, "assistant": 3, "system": 4, ":": 5}
    vocab.update({f"w{i}": i for i in range(len(vocab), 1024)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def remote_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("remote-servers"))
    try:
        servers.start_redis()
        servers.start_s3()
        yield servers
    finally:
        servers.stop()


class RemoteEnv:
    """The remote tier's servers for one test, and the cache config keys that use them."""

    def __init__(self, servers: Servers, prefix: str) -> None:
        self.servers = servers
        self.prefix = prefix
        self.path = f"s3://{BUCKET}/{prefix}"

    def cache(self, num_remote_blocks: int = 100_000, **custom: Any) -> dict[str, Any]:
        settings = {"redis_url": self.servers.redis_url, "timeout_s": 0.5, "retries": 1, "breaker_cooldown_s": 1.0}
        settings.update(custom)
        return {"enable_remote": True, "num_remote_blocks": num_remote_blocks, "remote_cache_path": self.path,
                "remote_config_custom": settings}

    def objects(self) -> list[str]:
        """The keys of this test's block objects in the bucket."""
        s3 = self.servers.client()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self.prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()) if not o["Key"].endswith(
            ".writable"))


@pytest.fixture
def remote(remote_servers: Servers, monkeypatch: pytest.MonkeyPatch,
           request: pytest.FixtureRequest) -> Iterator[RemoteEnv]:
    remote_servers.ensure_up()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FLEXKV_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", remote_servers.s3_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    prefix = f"{zlib.crc32(request.node.nodeid.encode()):08x}-{os.urandom(4).hex()}/"
    yield RemoteEnv(remote_servers, prefix)
    remote_servers.ensure_up()


@pytest.fixture(scope="session")
def vllm_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict]:
    """vllm_run(scenario, connector, kv_mib, cache=dict(...), extra=(...), model=path) -> the driver's JSON result
    (model: tiny_model unless given); a scenario run once per session with the same arguments is not run again."""
    results: dict = {}
    work = tmp_path_factory.mktemp("vllm-runs")

    def run_driver(scenario: str, connector: str = "builtin", kv_mib: float = SMALL_KV_MIB,
                   cache: dict | None = None, extra: tuple[str, ...] = (), model: Path | None = None) -> dict:
        model = model or tiny_model
        key = (scenario, connector, kv_mib, json.dumps(cache, sort_keys=True), extra, str(model))
        if key in results:
            return results[key]
        config = work / f"flexkv-{len(results)}.json"
        config.write_text(json.dumps({"cache_config": {"enable_cpu": True, "num_cpu_blocks": 512,
                                                       "tokens_per_block": 32, **(cache or {})}}))
        cmd = [sys.executable, str(VLLM_DRIVER), scenario, "--model", str(model), "--config", str(config),
               "--connector", connector, "--kv-cache-mib", str(kv_mib), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
        lines = [line for line in proc.stdout.splitlines() if line.startswith("FLEXKV_RESULT ")]
        assert lines, f"{' '.join(cmd)} printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        results[key] = json.loads(lines[-1][len("FLEXKV_RESULT "):])
        results[key]["stderr"] = proc.stderr
        return results[key]

    return run_driver
