"""FlexKV's tiers as vLLM KV events (adapters/vllm/kv_events.py), from a real control plane, in vLLM's own event
classes, through vLLM's msgpack encoding as its publisher sends them to Dynamo's router."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace
from typing import Any

import msgspec
import numpy as np
import pytest
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from flexkv.adapters.vllm.kv_events import MEDIUMS, TierEvents, tier_events_for

TPB = 16


def wire(events: list[Any]) -> list[Any]:
    """The events as the router's side decodes vLLM's published batch."""
    data = msgspec.msgpack.Encoder().encode(KVEventBatch(ts=0.0, events=events))
    return msgspec.msgpack.Decoder(type=KVEventBatch).decode(data).events


def named(events: TierEvents, kv: Any, tokens: np.ndarray, rng: random.Random, namespace: Any = None,
          **request: Any) -> list[Any]:
    """What the scheduler side does for a request: its key chain of ``tokens`` made, with vLLM's block hashes
    (fresh random bytes here) in the request; returns the ids vLLM gives those blocks in its own events."""
    block_hashes = [rng.randbytes(32) for _ in range(len(tokens) // TPB)]
    req = SimpleNamespace(request_id=request.pop("request_id", "r"), block_hashes=block_hashes,
                          lora_request=request.pop("lora_request", None), cache_salt=request.pop("cache_salt", None))
    events.note_chain(kv.key_chain(tokens, namespace), req)
    return [maybe_convert_block_hash(h) for h in block_hashes]


def stored(events: list[Any], medium: str) -> list[Any]:
    return [e for e in events if isinstance(e, BlockStored) and e.medium == medium]


def test_cpu_and_ssd_blocks_are_stored_with_tokens_chain_and_medium(make_kv, seed: int) -> None:
    env = make_kv(ssd=True, num_cpu_blocks=8)
    events = TierEvents(env.kv, TPB)
    tokens = env.tokens(3 * TPB)
    ids = named(events, env.kv, tokens, random.Random(seed))  # vLLM's ids, not FlexKV's keys
    env.put(tokens, [0, 1, 2])
    assert env.kv.control_plane.flush(30)  # written through to SSD
    got = wire(events.take())
    for medium in (MEDIUMS["cpu"], MEDIUMS["ssd"]):
        runs = stored(got, medium)
        assert [h for e in runs for h in e.block_hashes] == ids, medium
        assert runs[0].parent_block_hash is None  # the sequence's first block: the router's root
        for e in runs:
            assert e.block_size == TPB and e.lora_name is None and e.extra_keys is None
            first = ids.index(e.block_hashes[0])
            assert e.parent_block_hash == (None if first == 0 else ids[first - 1])
            assert e.token_ids == tokens[first * TPB:(first + len(e.block_hashes)) * TPB].tolist()
    assert MEDIUMS == {"cpu": "CPU_PINNED", "ssd": "DISK"}  # no remote: every worker reads the shared tier
    assert events.take() == []  # drained


def test_a_block_leaving_a_tier_is_removed_with_the_hash_it_was_stored_with(make_kv, seed: int) -> None:
    env = make_kv(ssd=True, num_cpu_blocks=4, evict_ratio=0.0)
    events = TierEvents(env.kv, TPB)
    rng = random.Random(seed)
    first, second = env.tokens(3 * TPB), env.tokens(3 * TPB)
    first_ids = named(events, env.kv, first, rng, request_id="a")
    named(events, env.kv, second, rng, request_id="b")
    env.put(first, [0, 1, 2])
    assert env.kv.control_plane.flush(30)
    events.take()
    env.put(second, [3, 4, 5])  # 6 blocks in a 4-block CPU tier: some of the first leave it
    assert env.kv.control_plane.flush(30)
    got = wire(events.take())
    removed = [h for e in got if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(first_ids)
    assert all(e.medium == MEDIUMS["cpu"] for e in got if isinstance(e, BlockRemoved))
    assert not any(isinstance(e, AllBlocksCleared) for e in got)


def test_a_reset_removes_every_block_of_every_tier_then_clears(make_kv, seed: int) -> None:
    env = make_kv(ssd=True, num_cpu_blocks=8)
    events = TierEvents(env.kv, TPB)
    tokens = env.tokens(2 * TPB)
    ids = named(events, env.kv, tokens, random.Random(seed))
    env.put(tokens, [0, 1])
    assert env.kv.control_plane.flush(30)
    events.take()
    env.kv.reset()
    got = wire(events.take())
    assert isinstance(got[-1], AllBlocksCleared)
    for medium in (MEDIUMS["cpu"], MEDIUMS["ssd"]):
        gone = [h for e in got if isinstance(e, BlockRemoved) and e.medium == medium for h in e.block_hashes]
        assert sorted(gone) == sorted(ids), medium


def test_salted_and_lora_blocks_carry_their_namespace(make_kv, seed: int, caplog: pytest.LogCaptureFixture) -> None:
    env = make_kv(num_cpu_blocks=16)
    events = TierEvents(env.kv, TPB)
    tokens = env.tokens(2 * TPB)
    ns = ("salt:s1", "lora:ad1")
    ids = named(events, env.kv, tokens, random.Random(seed), ns, lora_request=SimpleNamespace(lora_name="ad1"),
                cache_salt="s1")
    env.put(tokens, [0, 1], namespace=ns)
    got = stored(wire(events.take()), MEDIUMS["cpu"])
    assert [h for e in got for h in e.block_hashes] == ids
    # as vLLM's own events: the adapter on every block, the salt on the sequence's first block only
    assert all(e.lora_name == "ad1" for e in got)
    assert [k for e in got for k in e.extra_keys] == [("ad1", "s1"), ("ad1",)]
    # A block no request of this process named (another engine stored it): not published, said once.
    with caplog.at_level(logging.WARNING, logger="flexkv"):
        env.put(env.tokens(TPB), [2], namespace=("salt:other",))
        assert events.take() == []
    assert "vLLM id is unknown here" in caplog.text


def test_a_block_size_other_than_the_engines_publishes_nothing(make_kv, caplog: pytest.LogCaptureFixture) -> None:
    env = make_kv()
    with caplog.at_level(logging.WARNING, logger="flexkv"):
        events = TierEvents(env.kv, 2 * TPB)
    assert "differs from vLLM's block size" in caplog.text
    env.put(env.tokens(TPB), [0])
    assert events.take() == []
    env.kv.control_plane.take_events()  # what the plane recorded is not this test's to check


def test_events_are_recorded_only_when_vllm_publishes_them(make_kv, seed: int) -> None:
    env = make_kv()
    scheduler = SimpleNamespace(kv=env.kv, block_size=TPB, chain_listeners=[])
    assert tier_events_for(SimpleNamespace(kv_events_config=None), scheduler) is None
    off = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=False))
    assert tier_events_for(off, scheduler) is None
    env.put(env.tokens(TPB), [0])
    assert env.kv.control_plane.take_events() == []  # never enabled: nobody pays for events nobody reads
    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    events = tier_events_for(on, scheduler)
    assert isinstance(events, TierEvents) and scheduler.chain_listeners == [events.note_chain]
    tokens = env.tokens(TPB)
    named(events, env.kv, tokens, random.Random(seed))
    env.put(tokens, [1])
    assert len(stored(events.take(), MEDIUMS["cpu"])) == 1
