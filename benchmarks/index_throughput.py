"""Index speed for 128K-token prompts: key hashing, match+plan, and block inserts.

Each figure is printed as a ratio against the issue's budget (match+plan <= 100 us
for a 128K-token prompt, >= 2M block inserts/s) and against a peer measured in the
same run: a Python dict from block key to block id, the index a plain Python
implementation would keep.

    python benchmarks/index_throughput.py [--tokens 131072] [--repeat 20]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from flexkv import CacheConfig, KVManager, ModelConfig, _core

from timing import best_of

MATCH_BUDGET_US = 100.0
INSERT_GOAL_PER_S = 2e6


def bench_block_size(tokens: np.ndarray, tpb: int, repeat: int) -> dict[str, float]:
    n_blocks = len(tokens) // tpb
    model = ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float16")
    kv = KVManager(model, CacheConfig(num_cpu_blocks=4 * n_blocks, tokens_per_block=tpb))
    kv.start()
    index = kv._tier.index
    seed = _core.namespace_key("bench")

    hash_s = best_of(lambda: _core.chain_block_keys(seed, tokens, tpb), repeat)
    keys = _core.chain_block_keys(seed, tokens, tpb)

    # Inserts: reserve + commit of a fresh 128K-token chain each time, on an emptied index.
    def insert_fresh() -> None:
        ids, _ = index.reserve(keys)
        index.commit(ids)

    insert_times = []
    for _ in range(repeat):
        index.reset()
        t0 = time.perf_counter()
        insert_fresh()
        insert_times.append(time.perf_counter() - t0)
    insert_s = min(insert_times)

    match_s = best_of(lambda: index.match(keys), repeat)

    # match+plan as the engine calls it: hash, longest prefix, lock, mask; then unlock.
    def get_match_cycle() -> None:
        task_id, _ = kv.get_match(tokens)
        kv.cancel(task_id)

    plan_s = best_of(get_match_cycle, repeat)
    t_cancel = best_of(lambda: kv.cancel(kv.get_match(tokens[:0])[0]), repeat)
    kv.shutdown()

    # Peer: a dict from key bytes to block id, looked up block by block.
    table = {k.tobytes(): i for i, k in enumerate(keys)}

    def dict_match() -> int:
        n = 0
        for k in keys:
            if k.tobytes() not in table:
                break
            n += 1
        return n

    dict_s = best_of(dict_match, max(3, repeat // 4))
    return {"blocks": n_blocks, "hash_us": hash_s * 1e6, "match_us": match_s * 1e6,
            "plan_us": max(plan_s - t_cancel, 0.0) * 1e6, "plan_cycle_us": plan_s * 1e6,
            "insert_per_s": n_blocks / insert_s, "dict_match_us": dict_s * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128 * 1024)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    tokens = np.random.default_rng(0).integers(0, 150_000, args.tokens, dtype=np.int64)
    print(f"index_throughput: {args.tokens} tokens per prompt, best of {args.repeat}, "
          f"{platform.processor() or platform.machine()}")
    header = (f"{'block':>5} {'blocks':>6} {'hash us':>8} {'match us':>8} {'match+plan us':>13} "
              f"{'vs budget':>9} {'vs dict':>8} {'inserts/s':>10} {'vs goal':>7}")
    print(header)
    for tpb in (16, 32, 64):
        r = bench_block_size(tokens, tpb, args.repeat)
        print(f"{tpb:>5} {r['blocks']:>6} {r['hash_us']:>8.1f} {r['match_us']:>8.1f} {r['plan_us']:>13.1f} "
              f"{r['plan_us'] / MATCH_BUDGET_US:>8.2f}x {r['dict_match_us'] / r['plan_us']:>7.1f}x "
              f"{r['insert_per_s'] / 1e6:>8.2f}M {r['insert_per_s'] / INSERT_GOAL_PER_S:>6.2f}x")
    print("vs budget: match+plan time / 100 us (<= 1 meets the goal); vs dict: how many times faster than a "
          "Python dict lookup of the same keys; vs goal: inserts/s / 2M (>= 1 meets the goal)")


if __name__ == "__main__":
    main()
