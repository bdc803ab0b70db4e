"""The manual's performance-test script (chapter 17.3.2), completed so that it runs.

Two cache configurations, the same request pattern, latency and hit rate of each.
Runs on the CPU: the engine's KV memory is a set of registered CPU tensors.

    python examples/manual_perf_test.py
"""

import time

import numpy as np
import torch

from flexkv.common.config import CacheConfig, ModelConfig
from flexkv.common.storage import KVCacheLayout, KVCacheLayoutType
from flexkv.kvmanager import KVManager

# A small model shape so that the script runs anywhere (the manual leaves it open).
model_config = ModelConfig(num_layers=2, num_kv_heads=1, head_size=32, dtype=torch.bfloat16)

# Config 1: small cache
config1 = CacheConfig(
    num_cpu_blocks=10000,
    tokens_per_block=16,
)

# Config 2: large cache
config2 = CacheConfig(
    num_cpu_blocks=100000,
    tokens_per_block=32,
)

ENGINE_BLOCKS = 512  # the engine's paged KV memory: blocks for one request of up to 8K tokens


def fixed_requests(seed: int = 0, n: int = 400) -> list[np.ndarray]:
    """A fixed request pattern: 60 documents of 4K tokens, popular ones asked about often."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 32000, 4096, dtype=np.int64) for _ in range(60)]
    picks = rng.zipf(1.2, n) % len(docs)
    return [np.concatenate([docs[p], rng.integers(0, 32000, 128, dtype=np.int64)]) for p in picks]


def test_performance(config: CacheConfig) -> tuple[float, float]:
    kv_manager = KVManager(model_config, config)
    kv_manager.start()
    tpb = config.tokens_per_block
    layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, model_config.num_layers, ENGINE_BLOCKS, tpb,
                           model_config.num_kv_heads, model_config.head_size)
    kv_caches = [torch.zeros(layout.kv_shape[1:], dtype=model_config.dtype) for _ in range(model_config.num_layers)]
    kv_manager.register_kv_caches(kv_caches, layout)

    # Run the requests: load what is cached, then store the rest (token i of a request in engine slot i).
    start_time = time.time()
    for token_ids in fixed_requests():
        task_id, mask = kv_manager.get_match(token_ids)
        kv_manager.launch(task_id, np.flatnonzero(mask))
        kv_manager.wait(task_id)
        task_id, mask = kv_manager.put_match(token_ids)
        kv_manager.launch(task_id, np.flatnonzero(mask))
        kv_manager.wait(task_id)
    end_time = time.time()

    # Metrics
    latency = end_time - start_time
    stats = kv_manager.cache_stats()
    hit_rate = stats["hit_rate"]
    kv_manager.shutdown()
    return latency, hit_rate


if __name__ == "__main__":
    for name, config in (("config1 (small, block 16)", config1), ("config2 (large, block 32)", config2)):
        latency, hit_rate = test_performance(config)
        print(f"{name}: latency {latency:.3f} s, hit rate {100 * hit_rate:.1f}%")
