"""The Python facade's cost over the C++ API: a put and a get of 1,000 blocks through KVManager vs _core.Cache.

Both facades drive one control plane (``_core.Cache.attach(kv.control_plane, ...)``), CPU tier only, and
copy between the same host engine memory (a TensorRT-LLM-style pool ``[blocks, layers, k|v,
tokens*heads*head_size]``, registered with both) and the same CPU tier, with the same two copy threads:

* put: ``KVManager.put_match + launch(slots) + wait`` vs ``Cache.store + wait`` of a fresh 1,000-block
  sequence read from the same 1,000 random engine blocks;
* get: ``KVManager.get_match + launch(slots) + wait`` vs ``Cache.load + wait`` of one cached 1,000-block
  sequence (the facades share keys, so it is the very same CPU blocks) into the same 1,000 random engine
  blocks.

Each call is timed from the first call to the end of ``wait``, hashing and index work included. The CPU
tier holds 3,000 blocks: warm-up rounds write every one of them, so the measured puts reuse evicted blocks
whose pages are mapped (the steady state of a full tier) and the get's sequence, touched every round,
stays. The two facades alternate within every round; the figure is the best round, and the overhead is
KVManager's time over Cache's, minus one (goal: <= 10%). Ceiling: one contiguous memcpy of the same bytes.

    python -P benchmarks/facade_overhead.py [--blocks 1000] [--block-kib 4,16,64] [--repeat 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from flexkv import CacheConfig, KVManager, ModelConfig, _core
from flexkv.core.layout import EngineLayout

TPB, LAYERS = 16, 4
GOAL = 0.10


def shape_for(block_kib: int) -> dict:
    """A float16 model whose blocks of TPB tokens hold block_kib KiB (layers x K,V x TPB x heads x head_size)."""
    per_head = TPB * LAYERS * 2 * 2  # bytes of one head_size element across the block
    elems = (block_kib << 10) // per_head
    heads = 1 if elems <= 128 else elems // 128
    return {"num_layers": LAYERS, "num_kv_heads": heads, "head_size": elems // heads, "dtype": "float16"}


def bench(block_kib: int, n_blocks: int, repeat: int, rng: np.random.Generator) -> dict[str, list[float]]:
    shape = shape_for(block_kib)
    model = ModelConfig(num_layers=shape["num_layers"], num_kv_heads=shape["num_kv_heads"],
                        head_size=shape["head_size"], dtype=shape["dtype"])
    block = model.block_bytes(TPB)
    assert block == block_kib << 10, (block, block_kib)
    engine_blocks = 2 * n_blocks
    kv = KVManager(model, CacheConfig(num_cpu_blocks=3 * n_blocks, tokens_per_block=TPB))
    kv.start()
    pool = rng.integers(0, 256, (engine_blocks, block), dtype=np.uint8)
    kv.register_kv_caches(EngineLayout.from_block_views([pool], "pool"))
    cache = _core.Cache.attach(kv.control_plane, shape)
    cache.register_block_major_pool(pool.ctypes.data, engine_blocks)

    order = rng.permutation(engine_blocks)
    put_blocks, get_blocks = order[:n_blocks].astype(np.int64), order[n_blocks:].astype(np.int64)
    offsets = np.arange(TPB, dtype=np.int64)
    put_slots = (put_blocks[:, None] * TPB + offsets).reshape(-1)
    get_slots = (get_blocks[:, None] * TPB + offsets).reshape(-1)

    def fresh() -> np.ndarray:
        return rng.integers(0, 150_000, n_blocks * TPB, dtype=np.int64)

    def py_put(tokens: np.ndarray) -> float:
        t0 = time.perf_counter()
        task, mask = kv.put_match(tokens)
        kv.launch(task, put_slots)
        ok = kv.wait(task)[task].ok
        dt = time.perf_counter() - t0
        assert ok and mask.all(), "KVManager put"
        return dt

    def cpp_put(tokens: np.ndarray) -> float:
        t0 = time.perf_counter()
        task, new, _ = cache.store(tokens, put_blocks)
        state = cache.wait(task)
        dt = time.perf_counter() - t0
        assert state == ("done", "") and new == n_blocks, ("Cache put", state, new)
        return dt

    cached = fresh()
    py_put(cached)

    def py_get() -> float:
        t0 = time.perf_counter()
        task, mask = kv.get_match(cached)
        kv.launch(task, get_slots)
        ok = kv.wait(task)[task].ok
        dt = time.perf_counter() - t0
        assert ok and mask.all(), "KVManager get"
        return dt

    def cpp_get() -> float:
        t0 = time.perf_counter()
        task, tokens, _ = cache.load(cached, 0, get_blocks)
        state = cache.wait(task)
        dt = time.perf_counter() - t0
        assert state == ("done", "") and tokens == n_blocks * TPB, ("Cache get", state, tokens)
        return dt

    src = np.ones(n_blocks * block, dtype=np.uint8)
    dst = np.ones(n_blocks * block, dtype=np.uint8)

    def memcpy() -> float:
        t0 = time.perf_counter()
        _core.memcpy(dst.ctypes.data, src.ctypes.data, n_blocks * block)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: every CPU block written once, both paths run
        py_put(fresh())
        cpp_put(fresh())
        py_get()
        cpp_get()
    out: dict[str, list[float]] = {k: [] for k in ("py_put", "cpp_put", "py_get", "cpp_get", "memcpy")}
    for r in range(repeat):
        a, b = fresh(), fresh()
        first_py = r % 2 == 0  # alternate which facade goes first
        puts = (("py_put", py_put, a), ("cpp_put", cpp_put, b))
        for name, put, tokens in puts if first_py else puts[::-1]:
            out[name].append(put(tokens))
        for name, fn in ((("py_get", py_get), ("cpp_get", cpp_get)) if first_py else
                         (("cpp_get", cpp_get), ("py_get", py_get))):
            out[name].append(fn())
        out["memcpy"].append(memcpy())
    locked = kv.control_plane.locked_blocks()
    kv.shutdown()
    assert locked == (0, 0), f"blocks left locked: {locked}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1000)
    p.add_argument("--block-kib", default="4,16,64", help="block sizes in KiB, comma-separated")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"facade_overhead: {args.blocks} blocks of {TPB} tokens per call, host engine memory, CPU tier only, "
          f"best of {args.repeat} alternating rounds")
    print(f"{'block':>6} {'op':>4} {'C++ Cache us':>12} {'KVManager us':>12} {'overhead':>8} {'goal':>5} "
          f"{'C++ vs memcpy':>13} {'noise py/C++':>12}")
    for kib in (int(k) for k in args.block_kib.split(",")):
        t = bench(kib, args.blocks, args.repeat, rng)
        for op in ("put", "get"):
            py, cpp, mc = min(t[f"py_{op}"]), min(t[f"cpp_{op}"]), min(t["memcpy"])
            over = py / cpp - 1
            noise = (statistics.median(t[f"py_{op}"]) / py, statistics.median(t[f"cpp_{op}"]) / cpp)
            print(f"{kib:>4}Ki {op:>4} {cpp * 1e6:>12.0f} {py * 1e6:>12.0f} {over:>+7.1%} "
                  f"{'met' if over <= GOAL else 'MISS':>5} {cpp / mc:>12.2f}x {noise[0]:>6.2f}/{noise[1]:.2f}")
    print("overhead: KVManager time / Cache time - 1 (goal <= +10%); C++ vs memcpy: Cache time over one contiguous "
          "memcpy of the same bytes; noise: median / best")


if __name__ == "__main__":
    main()
