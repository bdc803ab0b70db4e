"""The remote tier on real servers (SeaweedFS's S3 and Redis on 127.0.0.1, tests/remote_servers.py): two
"nodes" (managers, each with its own CPU and SSD tiers) share blocks byte-exact through one bucket and one
index; the manual's 17.2 config starts all three tiers; faults (servers killed, hung, restarted empty,
objects corrupted, truncated or deleted behind the index, read-only credentials) become misses or skipped
stores within the bound, counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from remote_servers import BUCKET, READ_ACCESS_KEY, READ_SECRET_KEY

from flexkv.core.errors import ConfigError

from kv_helpers import S, store

TPB = 16
N = 8  # blocks of the test's sequence
HERE = Path(__file__).resolve().parent
BOUND_S = 3.0  # a fault costs a request at most (1 + retries) * timeout_s = 1 s here; with slack for 2 cores


@pytest.fixture
def nodes(make_kv, remote, tmp_path: Path):
    """``nodes(k, **custom)``: k managers, each with its own CPU tier and SSD directory, sharing the remote
    tier (``custom``: remote_config_custom keys)."""
    def make(k: int = 2, ssd: bool = True, **custom):
        return [make_kv(ssd=[tmp_path / f"node{i}"] if ssd else False, **remote.cache(**custom)) for i in range(k)]
    return make


def share(a, tokens: np.ndarray) -> list:
    """Node a stores fresh data for the whole blocks of tokens and writes it through; returns the data."""
    data = a.put(tokens, list(range(len(tokens) // TPB)))
    assert a.kv.flush_remote(10)
    return data


def get_into(b, tokens: np.ndarray, dst: list[int]) -> tuple[int, float]:
    """A get on node b into poisoned engine blocks dst; returns (tokens loaded, seconds the get_match took)."""
    b.eng.poison(dst)
    t0 = time.monotonic()
    task, mask = b.kv.get_match(tokens)
    took = time.monotonic() - t0
    n = int(mask.sum()) // TPB
    b.kv.launch(task, b.slots(dst[:n]))
    assert b.kv.wait(task)[task].status is S.SUCCESS
    return n, took


def test_two_nodes_share_blocks_byte_exact(nodes, remote, seed: int) -> None:
    print(f"data seed {seed}")
    a, b = nodes()
    tokens = a.tokens(N * TPB + 5)
    data = share(a, tokens)
    sa = a.kv.cache_stats()
    assert sa["remote_written_blocks"] == N and sa["remote_write_errors"] == 0
    assert len(remote.objects()) == N
    assert all(key.startswith(remote.prefix) and len(key.rsplit("/", 1)[1]) == 32 for key in remote.objects())

    cpu, deeper = b.kv.lookup(tokens)
    assert (cpu, deeper) == (0, N * TPB)  # B holds nothing; the index holds every block
    dst = list(range(20, 20 + N))
    n, _ = get_into(b, tokens, dst)
    assert n == N
    b.eng.assert_blocks(dst, data)
    sb = b.kv.cache_stats()
    assert sb["remote_hit_blocks"] == N and sb["remote_mismatch_blocks"] == 0
    assert b.kv.lookup(tokens)[0] == N * TPB  # now in B's CPU tier
    assert b.kv.control_plane.flush(10)
    assert b.kv.cache_stats()["ssd_written_blocks"] == N  # remote hits land on B's SSD too

    # B stores the same blocks (and more): only the new ones reach the bucket, once.
    longer = np.concatenate([tokens[: N * TPB], b.tokens(2 * TPB)])
    store(b.kv, longer, list(range(40, 40 + N + 2)))
    assert b.kv.flush_remote(10)
    assert b.kv.cache_stats()["remote_written_blocks"] == 2
    assert len(remote.objects()) == N + 2
    assert b.kv.control_plane.flush(10)  # B's SSD write-through too: its blocks stay locked until written


def test_nodes_storing_the_same_blocks_store_them_once(nodes, remote) -> None:
    """Three nodes store the same blocks (the same bytes) at about the same time: their write-throughs run
    concurrently, and each block reaches the bucket once."""
    a, b, c = nodes(3, ssd=False)
    tokens = a.tokens(N * TPB)
    data = a.eng.fill(list(range(N)))
    for node in (b, c):
        for i, block in enumerate(data):
            node.eng.write(i, block)
    for node in (a, b, c):
        store(node.kv, tokens, list(range(N)))
    for node in (a, b, c):
        assert node.kv.flush_remote(10)
    assert sum(node.kv.cache_stats()["remote_written_blocks"] for node in (a, b, c)) == N
    assert len(remote.objects()) == N


def run_node(mode: str, cache: dict, tokens: np.ndarray, data: Path) -> dict:
    """tests/remote_node.py in a process of its own; returns its result line."""
    config = data.with_suffix(".json")
    config.write_text(json.dumps(cache))
    tokens_path = data.with_name(data.stem + "-tokens.npy")
    np.save(tokens_path, tokens)
    proc = subprocess.run([sys.executable, str(HERE / "remote_node.py"), mode, str(config), str(tokens_path),
                           str(data)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("FLEXKV_RESULT ")][-1]
    return json.loads(line[len("FLEXKV_RESULT "):])


def test_two_processes_share_blocks_byte_exact(remote, tmp_path: Path, seed: int) -> None:
    """Node A and node B are processes of their own (each its own CPU tier): B loads A's blocks byte-exact."""
    import remote_node

    rng = np.random.default_rng(seed)
    print(f"data seed {seed}")
    tokens = rng.integers(0, 50_000, N * TPB, dtype=np.int64)
    sent = rng.integers(0, 256, (N, remote_node.block_bytes()), dtype=np.uint8)
    np.save(tmp_path / "a.npy", sent)
    cache = {"tokens_per_block": TPB, "num_cpu_blocks": 64, **remote.cache()}
    a = run_node("store", cache, tokens, tmp_path / "a.npy")
    assert a["tokens"] == N * TPB and a["remote_written_blocks"] == N
    b = run_node("load", cache, tokens, tmp_path / "b.npy")
    assert b["tokens"] == N * TPB and b["remote_hit_blocks"] == N and b["remote_written_blocks"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), sent)


def test_ssd_blocks_then_remote_blocks_come_up_in_one_prefetch(nodes) -> None:
    """B holds a prompt's first blocks on its SSD only, the remote tier the rest: one prefetch brings both up
    (SSD first, the remote blocks continue them), and the get loads all of them."""
    a, b = nodes()
    tokens = a.tokens(N * TPB)
    data_a = share(a, tokens)
    half = N // 2
    data_b = b.eng.fill(list(range(half)))
    store(b.kv, tokens[: half * TPB], list(range(half)), completely=True)  # B's own bytes for the first half
    assert b.kv.invalidate(tokens) == half * TPB  # gone from B's CPU tier, still on its SSD
    assert b.kv.lookup(tokens) == (0, N * TPB)
    job = b.kv.prefetch_async(tokens)
    assert b.kv.wait(job, timeout=10)[job].status is S.SUCCESS
    assert b.kv.lookup(tokens)[0] == N * TPB
    dst = list(range(20, 20 + N))
    n, _ = get_into(b, tokens, dst)
    assert n == N
    b.eng.assert_blocks(dst[:half], data_b)
    b.eng.assert_blocks(dst[half:], data_a[half:])
    s = b.kv.cache_stats()
    assert s["ssd_hit_blocks"] == half and s["remote_hit_blocks"] == N - half
    assert b.kv.control_plane.flush(10)  # the remote blocks are written through to B's SSD too
    assert b.kv.cache_stats()["ssd_written_blocks"] == N


def test_two_servers_share_blocks_through_the_remote_tier(remote, tmp_path: Path, seed: int) -> None:
    """Two `flexkv serve` nodes (each its own CPU tier) with the remote tier: a client of A stores, the
    server writes through; a client of B prefetches (the server promotes in the background, try_wait says
    when) and loads byte-exact."""
    import torch
    from server_helpers import ServerProcess, client, copy_task, server_config

    from flexkv.core.data_plane import DataPlane

    from kv_helpers import engine_for

    servers = [ServerProcess(tmp_path, server_config(tmp_path, f"ipc://{tmp_path}/node{i}.sock",
                                                     cache_config=remote.cache())).start() for i in range(2)]
    writer, reader = client(servers[0].endpoint), client(servers[1].endpoint)
    planes = []
    try:
        tokens = np.random.default_rng(seed).integers(0, 50_000, 4 * TPB, dtype=np.int64)
        src = engine_for(writer, num_blocks=16, gen=torch.Generator().manual_seed(seed))
        dst = engine_for(reader, num_blocks=16, gen=torch.Generator().manual_seed(seed + 1))
        expected = src.fill(range(4))
        dst.poison()
        planes = [DataPlane(writer.tier_info(), src.engine_layout(), writer.cache_config),
                  DataPlane(reader.tier_info(), dst.engine_layout(), reader.cache_config)]
        task, _ = writer.put_match(tokens)
        copy_task(writer, planes[0], task, np.arange(4), store=True)
        deadline = time.monotonic() + 10
        while reader.lookup(tokens) != (0, 4 * TPB):  # B's server finds A's blocks in the index
            assert time.monotonic() < deadline, reader.lookup(tokens)
            time.sleep(0.05)
        job = reader.prefetch_async(tokens)
        while job not in reader.try_wait(job):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        task, mask = reader.get_match(tokens)
        assert mask.sum() == 4 * TPB
        moved = copy_task(reader, planes[1], task, np.array([8, 9, 10, 11]), store=False)
        assert sorted(moved) == [8, 9, 10, 11]
        dst.assert_blocks([8, 9, 10, 11], expected)
        stats = reader.cache_stats()
        assert stats["remote_hit_blocks"] == 4 and stats["cpu"]["num_locked"] == 0
        assert writer.cache_stats()["remote_written_blocks"] == 4
    finally:
        for plane in planes:
            plane.close()
        writer.shutdown()
        reader.shutdown()
        for server in servers:
            assert server.stop() == 0, server.output()


def test_prefetch_reports_then_get_hits(nodes) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    data = share(a, tokens)
    job = b.kv.prefetch_async(tokens)
    deadline = time.monotonic() + 10
    while job not in b.kv.try_wait(job):  # as vLLM's connector polls: None until the blocks are up
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert b.kv.lookup(tokens)[0] == N * TPB
    n, _ = get_into(b, tokens, list(range(10, 10 + N)))
    assert n == N
    b.eng.assert_blocks(list(range(10, 10 + N)), data)
    assert b.kv.wait(job)[job].status is S.NOTFOUND  # reported once


def test_index_lookup_is_one_round_trip(nodes, remote) -> None:
    (a,) = nodes(1, ssd=False)
    tokens = a.tokens(N * TPB)
    share(a, tokens)
    pool = a.kv.remote_tier.index.client.connection_pool
    sent = []
    real = pool.get_connection

    def counting(*args, **kwargs):
        conn = real(*args, **kwargs)
        send = conn.send_packed_command
        conn.send_packed_command = lambda *a, **k: (sent.append(1), send(*a, **k))[1]
        return conn
    pool.get_connection = counting
    try:
        longer = np.concatenate([tokens, a.tokens(3 * TPB)])
        assert a.kv.remote_tier.lookup(a.kv.block_keys(longer)) == N  # stops at the first block not indexed
    finally:
        pool.get_connection = real
    assert len(sent) == 1


def test_manual_distributed_worker_json_starts_three_tiers(remote, tmp_path: Path, monkeypatch) -> None:
    """The manual's 17.2 config, verbatim (examples/configs/distributed_worker.json); the endpoint through
    AWS_ENDPOINT_URL_S3, the index through FLEXKV_REDIS_URL, the SSD directory and size of this machine
    through FLEXKV_* overrides."""
    from flexkv import KVManager, ModelConfig
    from flexkv.core.config_file import load_config

    monkeypatch.setenv("FLEXKV_REDIS_URL", remote.servers.redis_url)
    monkeypatch.setenv("FLEXKV_SSD_CACHE_DIR", str(tmp_path / "ssd"))
    monkeypatch.setenv("FLEXKV_NUM_SSD_BLOCKS", "256")
    monkeypatch.setenv("worker_id", "0")  # the manual's ${worker_id}
    path = Path(__file__).resolve().parents[1] / "examples" / "configs" / "distributed_worker.json"
    config = load_config(path)
    cc = config.cache_config
    assert cc.enable_remote and cc.remote_cache_path == "s3://flexkv-cache/" and cc.num_remote_blocks == 20000000
    model = ModelConfig(num_layers=1, num_kv_heads=1, head_size=2, dtype="int8")
    kv = KVManager(model, cc)
    kv.start()
    try:
        stats = kv.cache_stats()
        assert stats["cpu"]["capacity"] == 200000 and stats["ssd"]["capacity"] == 256
        assert stats["remote"]["capacity"] == 20000000
        tier = kv.remote_tier
        assert tier.settings.bucket == "flexkv-cache" and tier.settings.endpoint_url == remote.servers.s3_url
    finally:
        kv.shutdown()


# ------------------------------------------------------------------------------------------- faults


def test_s3_killed_is_a_bounded_miss(nodes, remote) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    share(a, tokens)
    remote.servers.kill_s3()
    n, took = get_into(b, tokens, list(range(20, 20 + N)))
    assert n == 0 and took < BOUND_S
    s = b.kv.cache_stats()
    assert s["remote_read_errors"] + s["remote_refused_requests"] >= 1 and s["remote_hit_blocks"] == 0
    # puts go on; their write-through is skipped, counted
    store(b.kv, b.tokens(2 * TPB), [50, 51])
    assert b.kv.flush_remote(10)
    s = b.kv.cache_stats()
    assert s["remote_written_blocks"] == 0 and s["remote_write_errors"] + s["remote_write_skipped_blocks"] == 2


def test_s3_hung_is_a_bounded_miss(nodes, remote) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    data = share(a, tokens)
    remote.servers.hang_s3()
    try:
        n, took = get_into(b, tokens, list(range(20, 20 + N)))
        assert n == 0 and took < BOUND_S
        n, took = get_into(b, tokens, list(range(20, 20 + N)))  # the breaker is open now: no wait at all
        assert n == 0 and took < 0.5
        s = b.kv.cache_stats()
        assert s["remote_read_errors"] >= 1 and s["remote_refused_requests"] >= 1
    finally:
        remote.servers.resume_s3()
    time.sleep(1.1)  # the breaker's cooldown: the next request probes the server again (alone: the others of
    dst = list(range(20, 20 + N))  # its batch are refused, so the first get after it may load only a prefix)
    assert get_into(b, tokens, dst)[0] >= 1
    n, _ = get_into(b, tokens, dst)
    assert n == N
    b.eng.assert_blocks(dst, data)


def test_redis_killed_is_a_bounded_miss(nodes, remote) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    share(a, tokens)
    remote.servers.kill_redis()
    t0 = time.monotonic()
    assert b.kv.lookup(tokens) == (0, 0)
    n, took = get_into(b, tokens, list(range(20, 20 + N)))
    assert n == 0 and took < BOUND_S and time.monotonic() - t0 < 2 * BOUND_S
    store(b.kv, b.tokens(2 * TPB), [50, 51])
    assert b.kv.flush_remote(10)
    s = b.kv.cache_stats()
    assert s["remote_index_errors"] >= 1 and s["remote_written_blocks"] == 0


def test_redis_hung_is_a_bounded_miss(nodes, remote) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    share(a, tokens)
    remote.servers.hang_redis()
    try:
        n, took = get_into(b, tokens, list(range(20, 20 + N)))
        assert n == 0 and took < BOUND_S
        assert b.kv.cache_stats()["remote_index_errors"] >= 1
    finally:
        remote.servers.resume_redis()


def test_redis_restarted_empty_is_rebuilt_from_the_bucket(nodes, remote) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    data = share(a, tokens)
    remote.servers.kill_redis()
    remote.servers.start_redis()  # no persistence: it comes back empty
    time.sleep(1.1)  # the breaker (opened by nothing here, but a probe may have failed) cools down
    deadline = time.monotonic() + 10
    while b.kv.lookup(tokens)[1] < N * TPB:  # the first lookup starts the rebuild from the bucket's listing
        assert time.monotonic() < deadline, "the index was not rebuilt"
        time.sleep(0.05)
    dst = list(range(20, 20 + N))
    n, _ = get_into(b, tokens, dst)
    assert n == N
    b.eng.assert_blocks(dst, data)


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete", "replace"])
def test_object_damaged_behind_the_index_is_a_verified_miss(nodes, remote, damage: str) -> None:
    a, b = nodes(ssd=False)
    tokens = a.tokens(N * TPB)
    data = share(a, tokens)
    keys = b.kv.block_keys(tokens)
    tier = b.kv.remote_tier
    from flexkv.core.remote_tier import key_members

    bad = 5  # blocks 0..4 stay good
    key = tier.object_key(key_members(keys)[bad])
    s3 = remote.servers.client()
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    if damage == "corrupt":
        flipped = bytearray(body)
        flipped[-7] ^= 0xFF
        s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(flipped))
    elif damage == "truncate":
        s3.put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 2])
    elif damage == "delete":
        s3.delete_object(Bucket=BUCKET, Key=key)
    else:  # another block's object under this key
        other = s3.get_object(Bucket=BUCKET, Key=tier.object_key(key_members(keys)[0]))["Body"].read()
        s3.put_object(Bucket=BUCKET, Key=key, Body=other)
    dst = list(range(20, 20 + N))
    n, _ = get_into(b, tokens, dst)
    assert n == bad  # the blocks before the damaged one, byte-exact; never a wrong block
    b.eng.assert_blocks(dst[:bad], data[:bad])
    b.eng.assert_poisoned(dst[bad:])
    s = b.kv.cache_stats()
    if damage == "delete":
        assert s["remote_read_errors"] >= 1
    else:
        assert s["remote_mismatch_blocks"] == 1
    assert tier.lookup(keys) == bad  # the damaged block left the index


def test_read_only_credentials_read_but_skip_stores(nodes, remote, monkeypatch) -> None:
    (a,) = nodes(1, ssd=False)
    tokens = a.tokens(N * TPB)
    data = share(a, tokens)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READ_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READ_SECRET_KEY)
    (b,) = nodes(1, ssd=False)
    assert b.kv.remote_tier.read_only
    dst = list(range(20, 20 + N))
    n, _ = get_into(b, tokens, dst)
    assert n == N
    b.eng.assert_blocks(dst, data)
    store(b.kv, b.tokens(2 * TPB), [50, 51])
    assert b.kv.flush_remote(10)
    s = b.kv.cache_stats()
    assert s["remote_written_blocks"] == 0 and s["remote_write_skipped_blocks"] == 2


def test_lru_keeps_num_remote_blocks(nodes, remote) -> None:
    (a,) = nodes(1, ssd=False, num_remote_blocks=6)
    first = a.tokens(4 * TPB)
    second = a.tokens(4 * TPB)
    store(a.kv, first, [0, 1, 2, 3])
    assert a.kv.flush_remote(10)
    store(a.kv, second, [4, 5, 6, 7])
    assert a.kv.flush_remote(10)
    tier = a.kv.remote_tier
    assert tier.index_size() == 6 and len(remote.objects()) == 6
    assert tier.lookup(a.kv.block_keys(second)) == 4  # the oldest blocks left


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"remote_cache_path": "flexkv-cache"}, "cache_config.remote_cache_path", "not an S3 path"),
    ({"remote_cache_path": "s3://Bad_Bucket/"}, "cache_config.remote_cache_path", "not a valid bucket"),
    ({"custom": {"bucket": "other"}}, "cache_config.remote_config_custom.bucket", "does not match"),
    ({"custom": {"redis_url": "http://x"}}, "cache_config.remote_config_custom.redis_url", "not a Redis URL"),
    ({"custom": {"redis_url": "redis://127.0.0.1:1/0"}}, "cache_config.remote_config_custom.redis_url",
     "cannot reach Redis"),
    ({"custom": {"timeout_s": 0}}, "cache_config.remote_config_custom.timeout_s", ">= 0.01"),
    ({"custom": {"endpont": "x"}}, "cache_config.remote_config_custom.endpont", "unknown key"),
    ({"remote_cache_path": "s3://flexkv-no-such-bucket/"}, "cache_config.remote_cache_path", "does not exist"),
])
def test_bad_remote_config_is_one_clear_error(make_kv, remote, change: dict, key: str, words: str) -> None:
    cache = remote.cache(**change.pop("custom", {}))
    cache.update(change)
    with pytest.raises(ConfigError) as err:
        make_kv(**cache)
    assert err.value.key == key and words in str(err.value), str(err.value)


def test_missing_credentials_and_redis_are_clear_errors(make_kv, remote, monkeypatch) -> None:
    cache = remote.cache()
    del cache["remote_config_custom"]["redis_url"]
    with pytest.raises(ConfigError, match="FLEXKV_REDIS_URL") as err:
        make_kv(**cache)
    assert err.value.key == "cache_config.remote_config_custom.redis_url"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError, match="no AWS credentials"):
        make_kv(**remote.cache())
