"""Block events: the control plane says when a block becomes readable in a tier (with its key, parent key,
position and token ids) and when it leaves it, so a router can credit a worker for its CPU and SSD tiers."""

from __future__ import annotations

import numpy as np

TPB = 16


def events(kv) -> list[tuple]:
    return [(kind, tier, key[0].tobytes(), parent[0].tobytes(), int(position), tokens)
            for kind, tier, key, parent, position, tokens in kv.control_plane.take_events()]


def test_nothing_is_recorded_until_someone_listens(make_kv) -> None:
    env = make_kv()
    env.put(env.tokens(2 * TPB), [0, 1])
    assert env.kv.control_plane.take_events() == []


def test_stored_blocks_carry_their_chain_and_tokens_in_each_tier(make_kv) -> None:
    env = make_kv(ssd=True, num_cpu_blocks=4)
    kv = env.kv
    kv.control_plane.enable_events(1024)
    tokens = env.tokens(3 * TPB)
    env.put(tokens, [0, 1, 2])
    keys = [k.tobytes() for k in kv.block_keys(tokens)]
    assert kv.control_plane.flush(30) and kv.lookup(tokens)[1] == 3 * TPB  # written through
    got = events(kv)
    for tier in ("cpu", "ssd"):
        stored = [e for e in got if e[0] == "stored" and e[1] == tier]
        assert [e[2] for e in stored] == keys, tier
        assert [e[3] for e in stored[1:]] == keys[:2]  # each block's parent is the block before it
        assert [e[4] for e in stored] == [0, 1, 2]
        for i, e in enumerate(stored):
            assert np.array_equal(e[5], tokens[i * TPB:(i + 1) * TPB])
    # A fourth and fifth block push the CPU tier (4 blocks) to evict: those blocks leave the CPU tier only.
    env.put(env.tokens(2 * TPB), [3, 4])
    assert kv.control_plane.flush(30)  # their write-throughs end before reset(), which refuses a running one
    removed = [e for e in events(kv) if e[0] == "removed"]
    assert removed and all(e[1] == "cpu" and e[2] in keys for e in removed)
    kv.reset()
    assert {(e[0], e[1]) for e in events(kv)} == {("cleared", "cpu"), ("cleared", "ssd")}


def test_a_full_log_drops_the_oldest_and_counts_them(make_kv) -> None:
    env = make_kv()
    env.kv.control_plane.enable_events(2)
    env.put(env.tokens(5 * TPB), [0, 1, 2, 3, 4])
    assert len(env.kv.control_plane.take_events()) == 2
    assert env.kv.control_plane.events_dropped == 3
