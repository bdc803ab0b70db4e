"""The SSD tier through KVManager: write-through, promotion, verification, warm restart, faults.

Every test runs on io_uring and on the thread-pool fallback. The CPU tier is kept
small so that blocks must come back from SSD.
"""

from __future__ import annotations

import errno
import os
import subprocess
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, KVCacheLayout, KVCacheLayoutType, KVManager, ModelConfig
from flexkv.core.control_plane import FaultInjectingIoEnv
from flexkv.core.errors import ConfigError

from kv_helpers import assert_no_locks, bitwise_equal, poison, random_tokens, slots_for

TPB, LAYERS, HEADS, HEAD, ENGINE_BLOCKS = 16, 2, 2, 64, 64
ENGINES = ["io_uring", "threads"]


def model() -> ModelConfig:
    return ModelConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16)


def make(dirs: list[Path], engine: str, cpu_blocks: int = 8, ssd_blocks: int = 64, faults: Any = None,
         **extra) -> tuple[KVManager, list[torch.Tensor]]:
    """A started, registered manager; ``faults`` (a FaultInjectingIoEnv) replaces the SSD tier's I/O."""
    cfg = CacheConfig(num_cpu_blocks=cpu_blocks, tokens_per_block=TPB, enable_ssd=True, num_ssd_blocks=ssd_blocks,
                      ssd_cache_dir=";".join(str(d) for d in dirs), **extra)
    kv = KVManager(model(), cfg, ssd_io_engine=engine, ssd_env=faults)
    kv.start()
    caches = [torch.zeros(2, ENGINE_BLOCKS, TPB, HEADS, HEAD, dtype=torch.float16) for _ in range(LAYERS)]
    kv.register_kv_caches(caches, KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, ENGINE_BLOCKS, TPB, HEADS,
                                                HEAD))
    return kv, caches


def fill(caches: list[torch.Tensor], blocks, gen: torch.Generator) -> list[torch.Tensor]:
    """Writes fresh random KV into engine blocks; returns a copy of it per layer."""
    idx = torch.as_tensor(list(blocks))
    for c in caches:
        c[:, idx] = torch.randn(2, len(idx), TPB, HEADS, HEAD, generator=gen, dtype=torch.float32).half()
    return [c[:, idx].clone() for c in caches]


def put_completely(kv: KVManager, tokens: np.ndarray, blocks) -> None:
    task_id, mask = kv.put_match(tokens)
    kv.launch(task_id, slots_for(mask, list(blocks), TPB))
    assert kv.wait(task_id, completely=True)[task_id].ok


def get(kv: KVManager, tokens: np.ndarray, blocks):
    task_id, mask = kv.get_match(tokens)
    kv.launch(task_id, slots_for(mask, list(blocks), TPB))
    return mask, kv.wait(task_id)[task_id]


def push_out_of_cpu(kv: KVManager, caches, gen, rng, n_seq: int = 3) -> None:
    """Stores other sequences until the small CPU tier has evicted what was there."""
    for _ in range(n_seq):
        fill(caches, range(40, 48), gen)
        put_completely(kv, random_tokens(rng, 8 * TPB), range(40, 48))


def seeds(request) -> tuple[torch.Generator, np.random.Generator]:
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed), np.random.default_rng(seed)


@pytest.fixture
def ssd_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ssd"
    d.mkdir()
    return d


def slot_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("flexkv-*/*") if p.is_file())


@pytest.mark.parametrize("engine", ENGINES)
def test_blocks_evicted_from_cpu_come_back_from_ssd_byte_exact(engine: str, ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], engine)
    try:
        assert kv.control_plane.ssd_io_engine == engine
        tokens = random_tokens(rng, 6 * TPB + 3)
        want = fill(caches, range(6), gen)
        put_completely(kv, tokens, range(6))
        assert kv.cache_stats()["ssd_written_blocks"] == 6
        push_out_of_cpu(kv, caches, gen, rng)
        task_id, mask = kv.get_match(tokens)
        assert mask.sum() == 6 * TPB  # promised from SSD, not on CPU any more
        kv.cancel(task_id)
        kv.wait(task_id)
        poison(caches)
        mask, res = get(kv, tokens, range(10, 16))
        assert res.ok and res.return_mask.sum() == 6 * TPB
        for w, c in zip(want, caches):
            assert bitwise_equal(w, c[:, 10:16])
        assert kv.cache_stats()["ssd_hit_tokens"] >= 6 * TPB
        assert_no_locks(kv)
    finally:
        kv.shutdown()


@pytest.mark.parametrize("engine", ENGINES)
def test_several_directories_share_the_blocks(engine: str, tmp_path: Path, request) -> None:
    gen, rng = seeds(request)
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    kv, caches = make(dirs, engine, ssd_blocks=48)
    try:
        tokens = random_tokens(rng, 7 * TPB)
        want = fill(caches, range(7), gen)
        put_completely(kv, tokens, range(7))
        push_out_of_cpu(kv, caches, gen, rng)
        poison(caches)
        mask, res = get(kv, tokens, range(20, 27))
        assert res.ok and mask.sum() == 7 * TPB
        for w, c in zip(want, caches):
            assert bitwise_equal(w, c[:, 20:27])
        assert all(slot_files(d) for d in dirs)  # every directory holds slot files
    finally:
        kv.shutdown()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restart_keeps_the_hits(engine: str, ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], engine)
    tokens = random_tokens(rng, 5 * TPB)
    try:
        want = fill(caches, range(5), gen)
        put_completely(kv, tokens, range(5))
    finally:
        kv.shutdown()
    kv, caches = make([ssd_dir], engine)  # a new process would see the same files
    try:
        assert kv.control_plane.ssd_restored >= 5
        poison(caches)
        mask, res = get(kv, tokens, range(30, 35))
        assert res.ok and mask.sum() == 5 * TPB
        for w, c in zip(want, caches):
            assert bitwise_equal(w, c[:, 30:35])
    finally:
        kv.shutdown()


def test_a_restart_in_a_fresh_process_keeps_the_hits(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring")
    tokens = random_tokens(rng, 4 * TPB)
    try:
        want = fill(caches, range(4), gen)
        put_completely(kv, tokens, range(4))
    finally:
        kv.shutdown()
    np.save(ssd_dir.parent / "tokens.npy", tokens)
    torch.save(want, ssd_dir.parent / "want.pt")
    script = f"""
import numpy as np, torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_ssd_tier import make, get, TPB
from kv_helpers import bitwise_equal, poison
from pathlib import Path
from typing import Any
kv, caches = make([Path({str(ssd_dir)!r})], "io_uring")
tokens = np.load({str(ssd_dir.parent / "tokens.npy")!r})
want = torch.load({str(ssd_dir.parent / "want.pt")!r})
poison(caches)
mask, res = get(kv, tokens, range(4))
assert res.ok and mask.sum() == 4 * TPB, (mask.sum(), res)
assert all(bitwise_equal(w, c[:, 0:4]) for w, c in zip(want, caches))
kv.shutdown()
print("fresh-process-hit")
"""
    run = subprocess.run(["python", "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert "fresh-process-hit" in run.stdout, run.stderr


def _stored(kv, caches, gen, rng, n=4):
    tokens = random_tokens(rng, n * TPB)
    fill(caches, range(n), gen)
    put_completely(kv, tokens, range(n))
    push_out_of_cpu(kv, caches, gen, rng)
    return tokens


def _slot_offsets(kv, tokens) -> list[tuple[Path, int, int]]:
    """(file, header offset, payload offset) of each stored block of tokens, in chain order."""
    plane = kv.control_plane
    slots = plane.ssd_slots(plane.token_run(plane.seed("", []), tokens))
    assert len(slots) == len(tokens) // TPB
    # One directory, one file: slots follow each other, each a header then the payload padded to 4096.
    dirs = kv.cache_config.ssd_cache_dirs
    assert len(dirs) == 1
    (path,) = slot_files(Path(dirs[0]))
    slot_bytes = plane.ssd_slot_bytes
    payload = -(-kv.block_bytes // 4096) * 4096
    return [(path, int(s) * slot_bytes, int(s) * slot_bytes + slot_bytes - payload) for s in slots]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("damage", ["payload", "header", "truncate"])
def test_damaged_blocks_become_misses_never_wrong_bytes(engine: str, damage: str, ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], engine)
    try:
        tokens = _stored(kv, caches, gen, rng)
        where = _slot_offsets(kv, tokens)
        path, header, payload = where[2]  # damage block 2: blocks 0 and 1 still load
        if damage == "payload":
            _flip(path, payload + 123)
        elif damage == "header":
            _flip(path, header + 40)
        else:
            os.truncate(path, payload + 100)
        poison(caches)
        mask, res = get(kv, tokens, range(50, 54))
        assert mask.sum() == 4 * TPB  # promised before the bytes were read
        assert not res.ok and res.return_mask.sum() == 2 * TPB  # only the verified prefix arrived
        assert all(torch.isnan(c[:, 52:54]).all() for c in caches)  # the damaged block never reached the engine
        stats = kv.cache_stats()
        assert stats["ssd_mismatch_blocks"] + stats["ssd_read_errors"] >= 1
        # The dropped block is a miss from now on; the index stays consistent and unlocked.
        task_id, mask = kv.get_match(tokens)
        assert mask.sum() == 2 * TPB
        kv.cancel(task_id)
        kv.wait(task_id)
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_a_directory_of_another_layout_is_ignored(ssd_dir: Path, request, caplog) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring")
    tokens = random_tokens(rng, 3 * TPB)
    try:
        fill(caches, range(3), gen)
        put_completely(kv, tokens, range(3))
    finally:
        kv.shutdown()
    other = ModelConfig(num_layers=LAYERS, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.bfloat16)
    cfg = CacheConfig(num_cpu_blocks=8, tokens_per_block=TPB, enable_ssd=True, num_ssd_blocks=64,
                      ssd_cache_dir=str(ssd_dir))
    with caplog.at_level("WARNING", logger="flexkv"):
        kv2 = KVManager(other, cfg)
        kv2.start()
    try:
        assert kv2.control_plane.ssd_restored == 0
        assert "another model or KV layout" in caplog.text
        before = {p: p.stat().st_mtime_ns for p in slot_files(ssd_dir)}
    finally:
        kv2.shutdown()
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if "flexkv-" in str(p))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_errors_skip_the_store_and_nothing_breaks(engine: str, err: int, ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    faults = FaultInjectingIoEnv(engine)
    kv, caches = make([ssd_dir], engine, faults=faults)
    try:
        faults.fail_writes(err, 0, -1)
        tokens = random_tokens(rng, 4 * TPB)
        want = fill(caches, range(4), gen)
        put_completely(kv, tokens, range(4))
        assert kv.cache_stats()["ssd_write_errors"] >= 4
        # Still on CPU: loads fine.
        poison(caches)
        _, res = get(kv, tokens, range(10, 14))
        assert res.ok and all(bitwise_equal(w, c[:, 10:14]) for w, c in zip(want, caches))
        faults.clear()
        push_out_of_cpu(kv, caches, gen, rng)
        # Off the CPU and never stored on SSD: a clean miss.
        task_id, mask = kv.get_match(tokens)
        assert not mask.any()
        kv.wait(task_id)
        assert_no_locks(kv)
    finally:
        kv.shutdown()


@pytest.mark.parametrize("engine", ENGINES)
def test_read_errors_are_misses(engine: str, ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    faults = FaultInjectingIoEnv(engine)
    kv, caches = make([ssd_dir], engine, faults=faults)
    try:
        tokens = _stored(kv, caches, gen, rng)
        faults.fail_reads(errno.EIO, 0, -1)
        poison(caches)
        _, res = get(kv, tokens, range(50, 54))
        assert not res.ok and not res.return_mask.any()
        assert all(torch.isnan(c[:, 50:54]).all() for c in caches)
        assert kv.cache_stats()["ssd_read_errors"] >= 1
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_torn_writes_are_caught_on_read(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    faults = FaultInjectingIoEnv("io_uring")
    kv, caches = make([ssd_dir], "io_uring", faults=faults)
    try:
        faults.tear_writes(1)
        tokens = _stored(kv, caches, gen, rng, n=3)
        poison(caches)
        _, res = get(kv, tokens, range(50, 53))
        assert not res.ok
        assert res.return_mask.sum() < 3 * TPB
        assert kv.cache_stats()["ssd_mismatch_blocks"] >= 1
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_prefetch_brings_blocks_up_without_a_launch(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring")
    try:
        tokens = _stored(kv, caches, gen, rng)
        assert kv.lookup(tokens)[0] == 0
        task_id = kv.prefetch_async(tokens)
        assert kv.wait(task_id)[task_id].ok
        assert kv.lookup(tokens)[0] == 4 * TPB
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_cancel_during_a_promotion_unlocks_everything(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring")
    try:
        tokens = _stored(kv, caches, gen, rng)
        task_id, mask = kv.get_match(tokens)
        assert mask.sum() == 4 * TPB
        kv.cancel(task_id)
        res = kv.wait(task_id)[task_id]
        assert res.status.value == "cancelled" and not res.return_mask.any()
        assert_no_locks(kv)
    finally:
        kv.shutdown()


def test_bad_directories_are_clear_errors_at_start(tmp_path: Path) -> None:
    def start(dirs: str, **kw) -> None:
        cfg = CacheConfig(num_cpu_blocks=8, tokens_per_block=TPB, enable_ssd=True, num_ssd_blocks=kw.pop("n", 16),
                          ssd_cache_dir=dirs)
        KVManager(model(), cfg).start()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=str(a_file)):
        start(str(a_file))
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    slot = 4096 + model().block_bytes(TPB)
    with pytest.raises(ConfigError, match="num_ssd_blocks|space"):
        start(str(tmp_path / "big"), n=int(free // slot) * 4)


def test_two_caches_never_share_a_directory(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring")
    try:
        with pytest.raises(ConfigError, match="in use"):
            make([ssd_dir], "io_uring")
        tokens = random_tokens(rng, 2 * TPB)
        fill(caches, range(2), gen)
        put_completely(kv, tokens, range(2))
    finally:
        kv.shutdown()
    kv2, _ = make([ssd_dir], "io_uring")  # free again once the first has shut down
    try:
        assert kv2.control_plane.ssd_restored == 2
    finally:
        kv2.shutdown()


def test_a_put_whose_prefix_another_put_is_storing_still_reaches_ssd(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring", cpu_blocks=16)
    try:
        tokens = random_tokens(rng, 8 * TPB)
        fill(caches, range(8), gen)
        short_id, short_mask = kv.put_match(tokens[: 4 * TPB])   # blocks 0-3, still being stored
        long_id, long_mask = kv.put_match(tokens)                  # blocks 4-7 only
        assert short_mask.sum() == 4 * TPB and long_mask.sum() == 4 * TPB
        kv.launch(long_id, slots_for(long_mask, list(range(8)), TPB))  # the longer one finishes first
        kv.launch(short_id, slots_for(short_mask, list(range(8)), TPB))
        res = kv.wait([long_id, short_id], completely=True)
        assert res[long_id].ok and res[short_id].ok
        assert kv.lookup(tokens)[1] == 8 * TPB  # both halves are on SSD
    finally:
        kv.shutdown()


def test_a_restart_scans_the_written_slots_and_copes_without_the_mark(ssd_dir: Path, request) -> None:
    gen, rng = seeds(request)
    kv, caches = make([ssd_dir], "io_uring", ssd_blocks=10_000)
    tokens = random_tokens(rng, 3 * TPB)
    try:
        fill(caches, range(3), gen)
        put_completely(kv, tokens, range(3))
    finally:
        kv.shutdown()
    (mark,) = ssd_dir.glob(".flexkv-*.watermark")
    assert 3 <= int(mark.read_text()) < 10_000  # a restart reads a few headers, not all 10000
    for _ in range(2):
        kv, _ = make([ssd_dir], "io_uring", ssd_blocks=10_000)
        try:
            assert kv.control_plane.ssd_restored == 3
        finally:
            kv.shutdown()
        mark.unlink()  # the second start has no mark: it scans every slot and finds the same blocks
