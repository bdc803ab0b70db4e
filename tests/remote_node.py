"""A FlexKV "node" in a process of its own, for the remote tier's two-process test: a KVManager over a host
engine pool (one row of bytes per block, FlexKV's host block layout) that stores or loads one sequence.

    python tests/remote_node.py store|load CONFIG.json TOKENS.npy DATA.npy

``store`` stores DATA's rows as the blocks of TOKENS and waits for the write-through to the remote tier;
``load`` loads TOKENS into a zeroed pool and writes what arrived to DATA. Either prints one line
``FLEXKV_RESULT {json}`` (tokens loaded or stored, the manager's remote counters). The AWS and Redis settings
come from the environment and CONFIG.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

MODEL = {"num_layers": 2, "num_kv_heads": 2, "head_size": 8, "dtype": "float16"}
TPB = 16


def pool_manager(cache: dict[str, Any], pool: np.ndarray) -> Any:
    """A started KVManager whose engine memory is ``pool`` (blocks x block bytes, uint8)."""
    from flexkv import CacheConfig, KVManager, ModelConfig
    from flexkv.core.layout import EngineLayout

    kv = KVManager(ModelConfig(**MODEL), CacheConfig(**cache))
    kv.start()
    kv.register_kv_caches(EngineLayout.from_block_views([pool], "pool"))
    return kv


def block_bytes() -> int:
    from flexkv import ModelConfig

    return ModelConfig(**MODEL).block_bytes(TPB)


def slots(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64)[:, None] * TPB + np.arange(TPB)).reshape(-1)


def main() -> None:
    mode, config, tokens_path, data_path = sys.argv[1:5]
    with open(config, encoding="utf-8") as f:
        cache = json.load(f)
    tokens = np.load(tokens_path)
    n = len(tokens) // TPB
    pool = np.zeros((n, block_bytes()), dtype=np.uint8)
    if mode == "store":
        pool[:] = np.load(data_path)
    kv = pool_manager(cache, pool)
    try:
        if mode == "store":
            task, mask = kv.put_match(tokens)
        else:
            task, mask = kv.get_match(tokens)
        kv.launch(task, slots(int(mask.sum()) // TPB))
        assert kv.wait(task)[task].ok
        if mode == "store":
            assert kv.flush_remote(30)
        else:
            np.save(data_path, pool)
        stats = {k: v for k, v in kv.cache_stats().items() if k.startswith("remote_")}
        print("FLEXKV_RESULT " + json.dumps({"tokens": int(mask.sum()), **stats}), flush=True)
    finally:
        kv.shutdown()


if __name__ == "__main__":
    main()
