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
- ``remote_servers``: SeaweedFS (S3) and Redis on 127.0.0.1, started once per session (tests/remote_servers.py);
  ``remote``: those servers up, the AWS environment pointing at them, and a bucket prefix of the test's own.

The plain helpers (engine fake, store / load, slots, tokens) are in tests/kv_helpers.py.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from remote_servers import ACCESS_KEY, BUCKET, SECRET_KEY, Servers

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
