"""Tensor-parallel ranks in their own processes, each copying its head slice of every block: with the control
plane in the leader's process (tp_size > 1) and through `flexkv serve`. Byte-exact round trips into poisoned
blocks; a killed rank fails the copies it owes within its lease instead of hanging them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rank_helpers import HEAD, HEADS_PER_RANK, LAYERS, NUM_BLOCKS, make_file, rank_block, rank_tensors, spawn_rank
from server_helpers import LEASE_S, ServerProcess, client, server_config

from flexkv.core import EngineLayout, KVCacheLayout, KVCacheLayoutType, KVManager, RankAgent
from flexkv.core.server_launch import ServerSettings

from kv_helpers import configs, random_tokens, slots

TPB = 16
POISON = 0xA5


def start_ranks(port: str, tmp: Path, tp: int = 2, instance: int = 0):
    files = [tmp / f"rank{r}-{instance}.bin" for r in range(tp)]
    for f in files:
        make_file(f, TPB)
    procs = [spawn_rank(port, r, tp, f, TPB, tmp, instance) for r, f in enumerate(files)]
    return procs, [rank_tensors(f, TPB) for f in files]


def stop_ranks(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            p.wait(30)


def wait_ready(kv: KVManager, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not kv.is_ready():
        assert time.monotonic() < deadline, "the ranks did not all register"
        time.sleep(0.02)


def fill(views, blocks, gen: torch.Generator) -> None:
    for tensors in views:
        for t in tensors:
            for b in blocks:
                raw = t[:, b].contiguous().view(torch.uint8)
                t[:, b] = torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen).view(t.dtype).view(
                    t[:, b].shape)


def poison(views, blocks) -> None:
    for tensors in views:
        for t in tensors:
            t.view(torch.uint8).view(*t.shape[:2], -1)[:, list(blocks)] = POISON


def round_trip(kv: KVManager, views, tokens: np.ndarray, src: list[int], dst: list[int]) -> None:
    task, mask = kv.put_match(tokens)
    assert mask.sum() == len(src) * TPB
    kv.launch(task, slots(src, TPB))
    assert kv.wait(task, timeout=30)[task].status.name == "SUCCESS"
    task, mask = kv.get_match(tokens)
    assert mask.sum() == len(src) * TPB, "the stored blocks must hit"
    kv.launch(task, slots(dst, TPB))
    report = kv.wait(task, timeout=30)[task]
    assert report.status.name == "SUCCESS", report
    for tensors in views:
        for s, d in zip(src, dst):
            assert torch.equal(rank_block(tensors, d), rank_block(tensors, s)), f"block {s} -> {d} differs"


def test_two_ranks_of_an_in_process_plane_copy_their_head_slices(tmp_path: Path, rng, gen) -> None:
    port = f"ipc://{tmp_path}/gpu_register"
    model, cache = configs(num_kv_heads=2, tp_size=2)
    kv = KVManager(model, cache, gpu_register_port=port, server_settings=ServerSettings(server_lease_seconds=LEASE_S))
    kv.start()
    procs, views = start_ranks(port, tmp_path)
    try:
        wait_ready(kv)
        fill(views, range(4), gen)
        poison(views, range(8, 16))
        tokens = random_tokens(rng, 4 * TPB)
        round_trip(kv, views, tokens, [0, 1, 2, 3], [8, 9, 10, 11])
        for tensors in views:
            assert all((rank_block(tensors, b) == POISON).all() for b in range(12, 16))
        # A rank killed mid-service: the copies it owes fail within its lease; none waits forever.
        procs[1].kill()
        procs[1].wait()
        task, mask = kv.get_match(tokens)
        kv.launch(task, slots([12, 13, 14, 15], TPB))
        t0 = time.monotonic()
        report = kv.wait(task, timeout=LEASE_S + 10)[task]
        assert report.status.name == "FAILED" and "rank 1" in report.error, report
        assert time.monotonic() - t0 < LEASE_S + 3
        assert kv.cache_stats()["cpu"]["num_locked"] == 0
    finally:
        stop_ranks(procs)
        kv.shutdown()


def test_ranks_of_a_server_client_copy_their_head_slices(tmp_path: Path, rng, gen) -> None:
    endpoint = f"ipc://{tmp_path}/serve"
    cfg = server_config(tmp_path, endpoint)
    data = json.loads(cfg.read_text())
    data["model_config"] = {**data["model_config"], "num_kv_heads": 2, "tp_size": 2}
    cfg.write_text(json.dumps(data))
    server = ServerProcess(tmp_path, cfg).start()
    kv = client(endpoint, num_kv_heads=2, tp_size=2)
    procs, views = start_ranks(f"{endpoint}_gpu_register", tmp_path)
    try:
        wait_ready(kv)
        fill(views, range(3), gen)
        poison(views, range(20, 24))
        round_trip(kv, views, random_tokens(rng, 3 * TPB + 7), [0, 1, 2], [21, 20, 23])
    finally:
        stop_ranks(procs)
        kv.shutdown()
        assert server.stop() == 0, server.output()


@pytest.mark.parametrize("what", ["model"])
def test_a_rank_of_another_model_is_refused_by_name(tmp_path: Path, what: str) -> None:
    port = f"ipc://{tmp_path}/gpu_register"
    model, cache = configs(num_kv_heads=4, tp_size=2)  # ranks would hold 2 heads each, the helper's hold 1
    kv = KVManager(model, cache, gpu_register_port=port, server_settings=ServerSettings(server_lease_seconds=LEASE_S))
    kv.start()
    try:
        make_file(tmp_path / "r.bin", TPB)
        with pytest.raises(AssertionError, match="did not start"):
            spawn_rank(port, 0, 2, tmp_path / "r.bin", TPB, tmp_path)
        assert not kv.is_ready()
    finally:
        kv.shutdown()


@pytest.mark.parametrize("where", ["in_process", "server"])
def test_a_layerwise_launch_hands_its_counter_to_every_rank(tmp_path: Path, rng, gen, where: str) -> None:
    """SGLang's layer-done counter of a layer-wise launch reaches every rank's agent with its orders (through
    the in-process dispatcher or `flexkv serve`); each rank hears every layer of its own copy on it, and its
    own slice has landed when it does. A rank also answers which of its copies of a task ended (wait_task)."""
    server = None
    if where == "server":
        endpoint = f"ipc://{tmp_path}/serve"
        cfg = server_config(tmp_path, endpoint)
        data = json.loads(cfg.read_text())
        data["model_config"] = {**data["model_config"], "num_kv_heads": 2, "tp_size": 2}
        cfg.write_text(json.dumps(data))
        server = ServerProcess(tmp_path, cfg).start()
        kv = client(endpoint, num_kv_heads=2, tp_size=2)
        port = f"{endpoint}_gpu_register"
    else:
        port = f"ipc://{tmp_path}/gpu_register"
        model, cache = configs(num_kv_heads=2, tp_size=2)
        kv = KVManager(model, cache, gpu_register_port=port,
                       server_settings=ServerSettings(server_lease_seconds=LEASE_S))
        kv.start()
    agents, views, heard = [], [], []
    try:
        for r in range(2):
            make_file(tmp_path / f"lw{r}.bin", TPB)
            tensors = rank_tensors(tmp_path / f"lw{r}.bin", TPB)
            kv_layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, NUM_BLOCKS, TPB, HEADS_PER_RANK, HEAD)
            layout = EngineLayout.from_kv_layout(tensors, kv_layout, tp_size=2, tp_rank=r)
            agent = RankAgent(port, lambda model, layout=layout: layout)
            views.append(tensors)
            heard.append([])
            agent.add_layer_listener(lambda counter, layer, r=r: heard[r].append(
                (counter, layer, torch.equal(rank_block(views[r], 9), rank_block(views[r], 1)))))
            agents.append(agent)
        wait_ready(kv)
        fill(views, range(3), gen)
        poison(views, range(8, 11))
        tokens = random_tokens(rng, 3 * TPB)
        task, _ = kv.put_match(tokens)
        kv.launch(task, slots([0, 1, 2], TPB))
        assert kv.wait(task, timeout=30)[task].status.name == "SUCCESS"
        task, _ = kv.get_match(tokens)
        kv.launch(task, slots([8, 9, 10], TPB), layerwise_transfer=True, counter_id=2)
        assert all(a.wait_task(task, timeout=30) for a in agents), "a rank's own copy did not end well"
        assert kv.wait(task, timeout=30)[task].status.name == "SUCCESS"
        deadline = time.monotonic() + 10
        while any(len(h) < LAYERS for h in heard) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heard == [[(2, layer, True) for layer in range(LAYERS)]] * 2, heard
        assert not agents[0].wait_task(task + 1000, timeout=0.1), "a task this rank never copied ended well"
    finally:
        for a in agents:
            a.close()
        kv.shutdown()
        if server is not None:
            assert server.stop() == 0, server.output()


@pytest.mark.gpu
def test_ranks_on_cuda_load_layer_by_layer(tmp_path: Path, rng, gen) -> None:
    """Two ranks' KV memory on a CUDA device, each copied by its own agent's GPU data plane: a layer-wise load
    signals every layer as it lands; a stream made to wait for a rank's layer (wait_task with a stream) sees
    that layer; the bytes are the rank's own, byte-exact."""
    port = f"ipc://{tmp_path}/gpu_register"
    model, cache = configs(num_kv_heads=2, tp_size=2)
    kv = KVManager(model, cache, gpu_register_port=port, server_settings=ServerSettings(server_lease_seconds=LEASE_S))
    kv.start()
    kv_layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, NUM_BLOCKS, TPB, HEADS_PER_RANK, HEAD)
    views = [[torch.randint(0, 256, (2, NUM_BLOCKS, TPB, HEADS_PER_RANK, HEAD * 2), dtype=torch.uint8, generator=gen)
              .view(torch.float16).cuda() for _ in range(LAYERS)] for _ in range(2)]
    agents, heard = [], [[], []]
    try:
        for r in range(2):
            layout = EngineLayout.from_kv_layout(views[r], kv_layout, tp_size=2, tp_rank=r)
            agents.append(RankAgent(port, lambda model, layout=layout: layout))
            agents[r].add_layer_listener(lambda counter, layer, r=r: heard[r].append((counter, layer)))
        wait_ready(kv)
        tokens = random_tokens(rng, 4 * TPB)
        task, _ = kv.put_match(tokens)
        kv.launch(task, slots([0, 1, 2, 3], TPB))
        assert kv.wait(task, timeout=30)[task].status.name == "SUCCESS"
        poison(views, range(8, 12))
        task, _ = kv.get_match(tokens)
        kv.launch(task, slots([8, 9, 10, 11], TPB), layerwise_transfer=True, counter_id=1)
        stream = torch.cuda.Stream()
        for r, agent in enumerate(agents):
            for layer in range(LAYERS):
                assert agent.wait_task(task, layer, stream.cuda_stream)
                with torch.cuda.stream(stream):
                    got = views[r][layer][:, 8:12].clone()
                stream.synchronize()
                assert torch.equal(got.view(torch.uint8), views[r][layer][:, 0:4].view(torch.uint8)), (r, layer)
        assert kv.wait(task, timeout=30)[task].status.name == "SUCCESS"
        deadline = time.monotonic() + 10
        while any(len(h) < LAYERS for h in heard) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heard == [[(1, layer) for layer in range(LAYERS)]] * 2, heard
    finally:
        for a in agents:
            a.close()
        kv.shutdown()
