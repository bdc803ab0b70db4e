"""One cache behind every facade: a block stored through the C++ API (``flexkv::Cache``) is found and loaded
byte-exact through KVManager and through PageStore with the same config, and the reverse; in one process
(the facades share one control plane) and across processes (through the SSD tier).

Engine memory is the engine fake's TensorRT-LLM-style pool ``[blocks, layers, k|v, tokens*heads*head_size]``
of fresh random bytes (seed printed); destinations are poisoned first, so a block that was not written cannot
pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from flexkv import _core
from flexkv.core.page_store import PageStore

from kv_helpers import slots

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


def pool_kv(make_kv, config: Path):
    """A manager opened from the config file, as every facade opens it, with a TensorRT-LLM pool registered."""
    env = make_kv(config=config, engine="trtllm_pool", engine_blocks=ENGINE_BLOCKS)
    assert env.eng.block_bytes == BLOCK
    return env


def test_one_process_every_facade_sees_every_block(make_kv, tmp_path: Path, rng: np.random.Generator) -> None:
    env = pool_kv(make_kv, write_config(tmp_path / "flexkv.json", None))
    kv, eng = env.kv, env.eng
    eng.fill(range(ENGINE_BLOCKS))
    cache = _core.Cache.attach(kv.control_plane, MODEL)
    cache.register_block_major_pool(eng.tensors[0].data_ptr(), ENGINE_BLOCKS)
    pages = PageStore(kv.model_config, kv.cache_config, namespace="", layout_tag="", control_plane=kv.control_plane)
    try:
        # Stored by the C++ API ...
        a = rng.integers(0, 50_000, 4 * TPB + 3)
        task, new, cached = cache.store(a, np.array([3, 9, 1, 20, 21]))
        assert (new, cached) == (4, 0) and cache.wait(task) == ("done", "")
        want = [eng.read(b) for b in (3, 9, 1, 20)]
        # ... is found and loaded by KVManager,
        assert kv.lookup(a) == (4 * TPB, 0)
        eng.poison([10, 11, 12, 13])
        tid, mask = kv.get_match(a)
        assert mask.sum() == 4 * TPB
        kv.launch(tid, slots([10, 11, 12, 13], TPB))
        assert kv.wait(tid)[tid].ok
        eng.assert_blocks([10, 11, 12, 13], want)
        # ... and by PageStore, whose keys for the same tokens are the same blocks.
        eng.poison([14, 15, 16, 17])
        assert pages.exists(pages.token_keys(a)) == 4
        assert pages.get(pages.token_keys(a), eng.engine_layout(), np.array([14, 15, 16, 17])) == 4
        eng.assert_blocks([14, 15, 16, 17], want)

        # The reverse: stored by KVManager, by PageStore; found by the C++ API.
        b = rng.integers(0, 50_000, 3 * TPB)
        b_data = eng.fill([4, 5, 6])
        tid, mask = kv.put_match(b)
        kv.launch(tid, slots([4, 5, 6], TPB))
        assert kv.wait(tid)[tid].ok
        c = rng.integers(0, 50_000, 2 * TPB)
        c_data = eng.fill([7, 8])
        assert pages.put(pages.token_keys(c), eng.engine_layout(), np.array([7, 8]),
                         prefix=np.zeros((0, 2), np.uint64)).all()
        for tokens, data, dst in ((b, b_data, [24, 25, 26]), (c, c_data, [27, 28])):
            assert cache.match(tokens) == len(data) * TPB
            eng.poison(dst)
            task, loaded, blocks = cache.load(tokens, 0, np.array(dst))
            assert (loaded, blocks) == (len(data) * TPB, len(data)) and cache.wait(task) == ("done", "")
            eng.assert_blocks(dst, data)
        # A salt is a namespace of its own, in every facade.
        assert cache.match(a, "tenant-b") == 0 and kv.lookup(a, "tenant-b") == (0, 0)
        assert kv.control_plane.locked_blocks() == (0, 0)
    finally:
        del cache
        pages.close()


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


def test_fresh_processes_share_blocks_through_the_ssd_tier(make_kv, tmp_path: Path,
                                                           rng: np.random.Generator) -> None:
    config = write_config(tmp_path / "flexkv.json", tmp_path / "ssd")
    # The C++ API stores in one process ...
    a = rng.integers(0, 50_000, 3 * TPB)
    data = rng.integers(0, 256, (3, BLOCK), dtype=np.uint8)
    assert "stored" in run_cpp_api(CPP_STORE, config=str(config), model=MODEL, data=data.tobytes().hex(),
                                   block=BLOCK, tokens=a.tolist())
    want = [torch.from_numpy(d) for d in data]
    # ... KVManager and PageStore in another find the blocks on SSD and load them byte-exact.
    env = pool_kv(make_kv, config)
    kv, eng = env.kv, env.eng
    assert kv.lookup(a) == (0, 3 * TPB)
    tid, mask = kv.get_match(a)
    kv.launch(tid, slots([0, 1, 2], TPB))
    assert kv.wait(tid)[tid].ok
    eng.assert_blocks([0, 1, 2], want)
    pages = PageStore(kv.model_config, kv.cache_config, namespace="", layout_tag="", control_plane=kv.control_plane)
    try:
        assert pages.get(pages.token_keys(a), eng.engine_layout(), np.array([5, 6, 7])) == 3
    finally:
        pages.close()
    eng.assert_blocks([5, 6, 7], want)
    # The reverse: KVManager stores, and the C++ API in a fresh process loads from SSD.
    b = rng.integers(0, 50_000, 2 * TPB)
    b_data = eng.fill([10, 11])
    tid, mask = kv.put_match(b)
    kv.launch(tid, slots([10, 11], TPB))
    assert kv.wait(tid, completely=True)[tid].ok  # written through to SSD
    kv.shutdown()  # the SSD directory belongs to one cache at a time
    out = run_cpp_api(CPP_LOAD, config=str(config), model=MODEL, blocks=2, block=BLOCK, tpb=TPB, tokens=b.tolist())
    got = np.frombuffer(bytes.fromhex(out.strip().splitlines()[-1]), dtype=np.uint8).reshape(2, BLOCK)
    assert all(torch.equal(torch.from_numpy(g.copy()), d) for g, d in zip(got, b_data))
