"""KVManager's task API from several threads at once: puts and gets of shared and distinct prefixes, and
many gets of one sequence.

Engine KV memory is the engine fake of tests/kv_helpers.py (CPU torch tensors). Every load goes into poisoned
(NaN) engine blocks and is compared byte for byte, so a block that was never written cannot pass. After every
test each manager's index must hold no lock and pass its consistency check (the make_kv fixture checks it
before shutting the manager down).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from kv_helpers import DEFAULT_CACHE, KVEnv, S, assert_clean

T = DEFAULT_CACHE["tokens_per_block"]


def test_concurrent_puts_and_gets_of_distinct_and_shared_prefixes(env: KVEnv) -> None:
    """Six threads store and load sequences that share a common prefix (all), a pair prefix (two threads)
    and a suffix of their own, half through get_async/put_async and half through match + launch.
    Every load a thread sees must be byte-exact; afterwards every sequence loads whole."""
    kv, eng = env.kv, env.eng
    n_threads, rounds = 6, 3
    blocks_per_thread = 10  # 5 source, 5 destination (4 whole blocks + the partial one each)
    common_tokens, common_data = env.tokens(2 * T), [eng.random_block() for _ in range(2)]
    pair_tokens = [env.tokens(T) for _ in range(n_threads // 2)]
    pair_data = [eng.random_block() for _ in range(n_threads // 2)]
    own_tokens = [[env.tokens(T + 3) for _ in range(rounds)] for _ in range(n_threads)]
    own_data = [[eng.random_block() for _ in range(rounds)] for _ in range(n_threads)]
    partial_data = [eng.random_block() for _ in range(n_threads)]

    def sequence(t: int, r: int) -> tuple[np.ndarray, list[torch.Tensor]]:
        tokens = np.concatenate([common_tokens, pair_tokens[t // 2], own_tokens[t][r]])
        return tokens, common_data + [pair_data[t // 2], own_data[t][r]]

    errors: list[BaseException] = []
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            base = t * blocks_per_thread
            src, dst = list(range(base, base + 5)), list(range(base + 5, base + 10))
            use_async = t % 2 == 0
            barrier.wait()
            for r in range(rounds):
                tokens, data = sequence(t, r)
                for b, d in zip(src, data + [partial_data[t]]):
                    eng.write(b, d)
                if use_async:
                    tid = kv.put_async(tokens, np.concatenate([env.slots(src[:4]), env.partial_slots(src[4], 3)]))
                else:
                    tid, mask = kv.put_match(tokens)
                    assert not mask[4 * T:].any()
                    kv.launch(tid, env.slots([b for i, b in enumerate(src[:4]) if mask[i * T]]))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS, res
                eng.poison(dst)
                if use_async:
                    tid = kv.get_async(tokens, np.concatenate([env.slots(dst[:4]), env.partial_slots(dst[4], 3)]))
                else:
                    tid, mask = kv.get_match(tokens)
                    kv.launch(tid, env.slots(dst[: int(mask.sum()) // T]))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS, res
                hit = int(res.return_mask.sum()) // T
                # Other threads may still be writing shared blocks: a get loads a (possibly empty) prefix.
                assert not res.return_mask[hit * T:].any() and res.return_mask[: hit * T].all()
                eng.assert_blocks(dst[:hit], data[:hit])
                for b in dst[hit:]:
                    assert eng.is_poisoned(b)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    if errors:
        raise errors[0]

    assert_clean(kv)
    dst = [60, 61, 62, 63]
    for t in range(n_threads):
        for r in range(rounds):
            tokens, data = sequence(t, r)
            env.get_and_check(tokens, dst, data)
    stats = kv.cache_stats()["cpu"]
    assert stats["num_cached"] == 2 + n_threads // 2 + n_threads * rounds
    assert stats["evicted"] == 0


def test_concurrent_gets_of_one_sequence(env: KVEnv) -> None:
    kv, eng = env.kv, env.eng
    tokens = env.tokens(3 * T)
    data = env.put(tokens, [0, 1, 2])
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            dst = [8 + 3 * t, 9 + 3 * t, 10 + 3 * t]
            for _ in range(20):
                eng.poison(dst)
                tid = kv.get_async(tokens, env.slots(dst))
                res = kv.wait(tid)[tid]
                assert res.status is S.SUCCESS and res.return_mask.all(), res
                eng.assert_blocks(dst, data)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a get did not end within 60 s"
    if errors:
        raise errors[0]
    assert kv.cache_stats()["get_hit_tokens"] == 8 * 20 * 3 * T
