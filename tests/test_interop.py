"""One cache behind every facade: a block stored through the C++ API (``flexkv::Cache``) is found and loaded
byte-exact through KVManager and through PageStore with the same config, and the reverse; in one process
(the facades share one control plane) and across processes (through the SSD tier).

Engine memory is a TensorRT-LLM-style pool ``[blocks, layers, k|v, tokens*heads*head_size]`` of fresh
random bytes (seed printed); destinations are poisoned first, so a block that was not written cannot pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from flexkv import KVManager, _core
from flexkv.core.config_file import load_config
from flexkv.core.layout import EngineLayout
from flexkv.core.page_store import PageStore

MODEL = {"num_layers": 2, "num_kv_heads": 2, "head_size": 16, "dtype": "float16"}
TPB = 16
BLOCK = TPB * MODEL["num_kv_heads"] * MODEL["head_size"] * 2 * 2 * MODEL["num_layers"]  # bytes
ENGINE_BLOCKS = 32


def write_config(path: Path, ssd_dir: Path | None) -> Path:
    cache = {"tokens_per_block": TPB, "num_cpu_blocks": 64}
    if ssd_dir is not None:
        cache.update({"enable_ssd": True, "num_ssd_blocks": 256, "ssd_cache_dir": str(ssd_dir)})
    path.write_text(json.dumps({"cache_config": cache, "model_config": MODEL}))
    return path


class Pool:
    """The engine's KV memory: ENGINE_BLOCKS contiguous blocks of BLOCK bytes."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.bytes = rng.integers(0, 256, (ENGINE_BLOCKS, BLOCK), dtype=np.uint8)

    def layout(self) -> EngineLayout:
        return EngineLayout.from_block_views([self.bytes], "pool")

    def poison(self, blocks) -> None:
        self.bytes[list(blocks)] = 0xA5


def manager(config: Path) -> KVManager:
    cfg = load_config(config)
    kv = KVManager(cfg.model_config, cfg.cache_config)
    kv.start()
    return kv


@pytest.fixture
def rng(request) -> np.random.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"{request.node.name}: seed {seed}")
    return np.random.default_rng(seed)


def test_one_process_every_facade_sees_every_block(tmp_path: Path, rng: np.random.Generator) -> None:
    config = write_config(tmp_path / "flexkv.json", None)
    kv = manager(config)
    pool = Pool(rng)
    kv.register_kv_caches(pool.layout())
    cache = _core.Cache.attach(kv.control_plane, MODEL)
    cache.register_block_major_pool(pool.bytes.ctypes.data, ENGINE_BLOCKS)
    pages = PageStore(kv.model_config, kv.cache_config, namespace="", layout_tag="", control_plane=kv.control_plane)
    try:
        # Stored by the C++ API ...
        a = rng.integers(0, 50_000, 4 * TPB + 3)
        task, new, cached = cache.store(a, np.array([3, 9, 1, 20, 21]))
        assert (new, cached) == (4, 0) and cache.wait(task) == ("done", "")
        want = pool.bytes[[3, 9, 1, 20]].copy()
        # ... is found and loaded by KVManager,
        assert kv.lookup(a) == (4 * TPB, 0)
        pool.poison([10, 11, 12, 13])
        tid, mask = kv.get_match(a)
        assert mask.sum() == 4 * TPB
        kv.launch(tid, (np.array([10, 11, 12, 13])[:, None] * TPB + np.arange(TPB)).reshape(-1))
        assert kv.wait(tid)[tid].ok
        assert np.array_equal(pool.bytes[[10, 11, 12, 13]], want)
        # ... and by PageStore, whose keys for the same tokens are the same blocks.
        pool.poison([14, 15, 16, 17])
        assert pages.exists(pages.token_keys(a)) == 4
        assert pages.get(pages.token_keys(a), pool.layout(), np.array([14, 15, 16, 17])) == 4
        assert np.array_equal(pool.bytes[[14, 15, 16, 17]], want)

        # The reverse: stored by KVManager, by PageStore; found by the C++ API.
        b = rng.integers(0, 50_000, 3 * TPB)
        pool.bytes[[4, 5, 6]] = rng.integers(0, 256, (3, BLOCK), dtype=np.uint8)
        tid, mask = kv.put_match(b)
        kv.launch(tid, (np.array([4, 5, 6])[:, None] * TPB + np.arange(TPB)).reshape(-1))
        assert kv.wait(tid)[tid].ok
        c = rng.integers(0, 50_000, 2 * TPB)
        pool.bytes[[7, 8]] = rng.integers(0, 256, (2, BLOCK), dtype=np.uint8)
        assert pages.put(pages.token_keys(c), pool.layout(), np.array([7, 8]), prefix=np.zeros((0, 2), np.uint64)).all()
        for tokens, src, dst in ((b, [4, 5, 6], [24, 25, 26]), (c, [7, 8], [27, 28])):
            assert cache.match(tokens) == len(src) * TPB
            pool.poison(dst)
            task, loaded, blocks = cache.load(tokens, 0, np.array(dst))
            assert (loaded, blocks) == (len(src) * TPB, len(src)) and cache.wait(task) == ("done", "")
            assert np.array_equal(pool.bytes[dst], pool.bytes[src])
        # A salt is a namespace of its own, in every facade.
        assert cache.match(a, "tenant-b") == 0 and kv.lookup(a, "tenant-b") == (0, 0)
        assert kv.control_plane.locked_blocks() == (0, 0)
    finally:
        del cache
        pages.close()
        kv.shutdown()


def run_cpp_api(script: str, **values: object) -> str:
    """Runs a Python script that drives only the C++ API (flexkv._core.Cache) in a fresh process."""
    code = textwrap.dedent(script).format(**{k: repr(v) for k, v in values.items()})
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


CPP_STORE = """
    import numpy as np
    from flexkv import _core
    cache = _core.Cache.open(open({config}).read(), {model})
    pool = np.frombuffer(bytes.fromhex({data}), dtype=np.uint8).reshape(-1, {block}).copy()
    cache.register_block_major_pool(pool.ctypes.data, len(pool))
    task, new, _ = cache.store(np.array({tokens}), np.arange(len(pool)))
    assert new == len(pool) and cache.wait(task) == ("done", "")
    del cache  # waits for the write-through to SSD
    print("stored")
"""

CPP_LOAD = """
    import numpy as np
    from flexkv import _core
    cache = _core.Cache.open(open({config}).read(), {model})
    pool = np.full(({blocks}, {block}), 0xA5, dtype=np.uint8)
    cache.register_block_major_pool(pool.ctypes.data, {blocks})
    assert cache.match(np.array({tokens})) == {blocks} * {tpb}, cache.match(np.array({tokens}))
    task, tokens, n = cache.load(np.array({tokens}), 0, np.arange({blocks}))
    assert cache.wait(task) == ("done", ""), cache.wait(task)
    print(pool.tobytes().hex())
"""


def test_fresh_processes_share_blocks_through_the_ssd_tier(tmp_path: Path, rng: np.random.Generator) -> None:
    config = write_config(tmp_path / "flexkv.json", tmp_path / "ssd")
    # The C++ API stores in one process ...
    a = rng.integers(0, 50_000, 3 * TPB)
    data = rng.integers(0, 256, (3, BLOCK), dtype=np.uint8)
    assert "stored" in run_cpp_api(CPP_STORE, config=str(config), model=MODEL, data=data.tobytes().hex(),
                                   block=BLOCK, tokens=a.tolist())
    # ... KVManager and PageStore in another find the blocks on SSD and load them byte-exact.
    kv = manager(config)
    pool = Pool(rng)
    kv.register_kv_caches(pool.layout())
    try:
        assert kv.lookup(a) == (0, 3 * TPB)
        pool.poison([0, 1, 2])
        tid, mask = kv.get_match(a)
        kv.launch(tid, (np.arange(3)[:, None] * TPB + np.arange(TPB)).reshape(-1))
        assert kv.wait(tid)[tid].ok
        assert np.array_equal(pool.bytes[:3], data)
        pages = PageStore(kv.model_config, kv.cache_config, namespace="", layout_tag="",
                          control_plane=kv.control_plane)
        pool.poison([5, 6, 7])
        assert pages.get(pages.token_keys(a), pool.layout(), np.array([5, 6, 7])) == 3
        assert np.array_equal(pool.bytes[5:8], data)
        # The reverse: KVManager stores, and the C++ API in a fresh process loads from SSD.
        b = rng.integers(0, 50_000, 2 * TPB)
        pool.bytes[[10, 11]] = rng.integers(0, 256, (2, BLOCK), dtype=np.uint8)
        tid, mask = kv.put_match(b)
        kv.launch(tid, (np.array([10, 11])[:, None] * TPB + np.arange(TPB)).reshape(-1))
        assert kv.wait(tid, completely=True)[tid].ok  # written through to SSD
        want = pool.bytes[[10, 11]].copy()
    finally:
        kv.shutdown()
    out = run_cpp_api(CPP_LOAD, config=str(config), model=MODEL, blocks=2, block=BLOCK, tpb=TPB, tokens=b.tolist())
    got = np.frombuffer(bytes.fromhex(out.strip().splitlines()[-1]), dtype=np.uint8).reshape(2, BLOCK)
    assert np.array_equal(got, want)
