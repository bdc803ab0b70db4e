"""The SSD tier through KVManager: write-through, promotion, verification, warm restart, faults.

Every test runs on io_uring and on the thread-pool fallback. The CPU tier is kept small so that blocks
must come back from SSD. Faults come in through the manager's ``ssd_env`` argument (a FaultInjectingIoEnv).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flexkv.core.control_plane import FaultInjectingIoEnv
from flexkv.core.errors import ConfigError

from kv_helpers import KVEnv, configs, hit_tokens, slots_for, store, try_load

TPB, HEAD = 16, 64
ENGINES = ["io_uring", "threads"]
HERE = Path(__file__).resolve().parent


@pytest.fixture
def make_ssd(make_kv):
    """make_kv with this file's defaults: head size 64, an 8-block CPU tier, a 64-block SSD tier in
    <tmp_path>/ssd (``ssd=[dirs]`` for others)."""
    def make(engine: str = "io_uring", **overrides) -> KVEnv:
        overrides.setdefault("ssd", True)
        overrides.setdefault("num_cpu_blocks", 8)
        return make_kv(ssd_io_engine=engine, head_size=HEAD, **overrides)
    return make


def put_completely(env: KVEnv, tokens: np.ndarray, blocks) -> list[torch.Tensor]:
    """Fills engine blocks with fresh data and stores it through to SSD; returns the data."""
    data = env.eng.fill(list(blocks))
    store(env.kv, tokens, list(blocks), completely=True)
    return data


def push_out_of_cpu(env: KVEnv, n_seq: int = 3) -> None:
    """Stores other sequences until the small CPU tier has evicted what was there."""
    for _ in range(n_seq):
        put_completely(env, env.tokens(8 * TPB), range(40, 48))


@pytest.fixture
def ssd_dir(tmp_path: Path) -> Path:
    return tmp_path / "ssd"  # make_ssd's default directory


def slot_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("flexkv-*/*") if p.is_file())


@pytest.mark.parametrize("engine", ENGINES)
def test_blocks_evicted_from_cpu_come_back_from_ssd_byte_exact(make_ssd, engine: str) -> None:
    env = make_ssd(engine)
    kv, eng = env.kv, env.eng
    assert kv.control_plane.ssd_io_engine == engine
    tokens = env.tokens(6 * TPB + 3)
    want = put_completely(env, tokens, range(6))
    assert kv.cache_stats()["ssd_written_blocks"] == 6
    push_out_of_cpu(env)
    assert kv.lookup(tokens)[0] < 6 * TPB  # not all on CPU any more
    assert hit_tokens(kv, tokens) == 6 * TPB  # promised from SSD
    eng.poison()
    mask, res = try_load(kv, tokens, range(10, 16))
    assert res.ok and res.return_mask.sum() == 6 * TPB
    eng.assert_blocks(range(10, 16), want)
    eng.assert_poisoned([16])
    assert kv.cache_stats()["ssd_hit_tokens"] >= 6 * TPB


@pytest.mark.parametrize("engine", ENGINES)
def test_several_directories_share_the_blocks(make_ssd, engine: str, tmp_path: Path) -> None:
    dirs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    env = make_ssd(engine, ssd=dirs, num_ssd_blocks=48)
    tokens = env.tokens(7 * TPB)
    want = put_completely(env, tokens, range(7))
    push_out_of_cpu(env)
    env.eng.poison()
    mask, res = try_load(env.kv, tokens, range(20, 27))
    assert res.ok and mask.sum() == 7 * TPB
    env.eng.assert_blocks(range(20, 27), want)
    assert all(slot_files(d) for d in dirs)  # every directory holds slot files


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restart_keeps_the_hits(make_ssd, engine: str) -> None:
    first = make_ssd(engine)
    tokens = first.tokens(5 * TPB)
    want = put_completely(first, tokens, range(5))
    first.kv.shutdown()
    env = make_ssd(engine)  # a new process would see the same files
    assert env.kv.control_plane.ssd_restored >= 5
    mask, res = try_load(env.kv, tokens, range(30, 35))
    assert res.ok and mask.sum() == 5 * TPB
    env.eng.assert_blocks(range(30, 35), want)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_restart_after_a_reset_restores_nothing_of_before(make_ssd, engine: str) -> None:
    """A reset (vLLM's reset_prefix_cache after a weight update) must not come back with the old KV when the
    process restarts: the SSD headers of every slot written before are zeroed, those of blocks the SSD tier had
    evicted included. Blocks stored after the reset come back."""
    first = make_ssd(engine, num_ssd_blocks=16)
    old, new = first.tokens(5 * TPB), first.tokens(3 * TPB)
    put_completely(first, old, range(5))
    for _ in range(3):  # 24 more blocks through the 16-slot SSD tier: some slots hold evicted blocks now
        put_completely(first, first.tokens(8 * TPB), range(40, 48))
    assert first.kv.cache_stats()["ssd"]["evicted"] > 0
    first.kv.reset()
    want = put_completely(first, new, range(5, 8))
    first.kv.shutdown()
    env = make_ssd(engine)
    assert env.kv.control_plane.ssd_restored == 3
    assert hit_tokens(env.kv, old) == 0
    mask, res = try_load(env.kv, new, range(30, 33))
    assert res.ok and mask.sum() == 3 * TPB
    env.eng.assert_blocks(range(30, 33), want)


FRESH_PROCESS = """
import sys
import numpy as np, torch
sys.path.insert(0, {here!r})
from kv_helpers import assert_clean, start_manager, try_load
kv, eng = start_manager(seed=0, ssd_dirs=[{ssd!r}], ssd_io_engine="io_uring", head_size={head}, num_cpu_blocks=8)
tokens = np.load({tokens!r})
want = torch.load({want!r})
mask, res = try_load(kv, tokens, range(4))
assert res.ok and mask.sum() == {n}, (mask.sum(), res)
eng.assert_blocks(range(4), want)
assert_clean(kv)
kv.shutdown()
print("fresh-process-hit")
"""


def test_a_restart_in_a_fresh_process_keeps_the_hits(make_ssd, ssd_dir: Path, tmp_path: Path) -> None:
    env = make_ssd()
    tokens = env.tokens(4 * TPB)
    want = put_completely(env, tokens, range(4))
    env.kv.shutdown()
    np.save(tmp_path / "tokens.npy", tokens)
    torch.save(want, tmp_path / "want.pt")
    script = FRESH_PROCESS.format(here=str(HERE), ssd=str(ssd_dir), head=HEAD, tokens=str(tmp_path / "tokens.npy"),
                                  want=str(tmp_path / "want.pt"), n=4 * TPB)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert "fresh-process-hit" in run.stdout, run.stderr


def _stored(env: KVEnv, n: int = 4) -> np.ndarray:
    tokens = env.tokens(n * TPB)
    put_completely(env, tokens, range(n))
    push_out_of_cpu(env)
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
def test_damaged_blocks_become_misses_never_wrong_bytes(make_ssd, engine: str, damage: str) -> None:
    env = make_ssd(engine)
    kv, eng = env.kv, env.eng
    tokens = env.tokens(4 * TPB)
    want = put_completely(env, tokens, range(4))
    push_out_of_cpu(env)
    where = _slot_offsets(kv, tokens)
    path, header, payload = where[2]  # damage block 2: blocks 0 and 1 still load
    if damage == "payload":
        _flip(path, payload + 123)
    elif damage == "header":
        _flip(path, header + 40)
    else:
        os.truncate(path, payload + 100)
    eng.poison()
    mask, res = try_load(kv, tokens, range(50, 54))
    assert mask.sum() == 4 * TPB  # promised before the bytes were read
    assert not res.ok and res.return_mask.sum() == 2 * TPB  # only the verified prefix arrived
    eng.assert_blocks(range(50, 52), want[:2])
    eng.assert_poisoned([52, 53])  # the damaged block never reached the engine, nor did the one after it
    stats = kv.cache_stats()
    assert stats["ssd_mismatch_blocks"] + stats["ssd_read_errors"] >= 1
    # The dropped block is a miss from now on (the fixture checks the index stays consistent and unlocked).
    assert hit_tokens(kv, tokens) == 2 * TPB


def test_a_directory_of_another_layout_is_ignored(make_ssd, ssd_dir: Path, caplog) -> None:
    first = make_ssd()
    put_completely(first, first.tokens(3 * TPB), range(3))
    first.kv.shutdown()
    before = {p: p.stat().st_mtime_ns for p in slot_files(ssd_dir)}
    assert before, "the first cache wrote no slot file"
    with caplog.at_level("WARNING", logger="flexkv"):
        other = make_ssd(dtype="bfloat16")
    assert other.kv.control_plane.ssd_restored == 0
    assert "another model or KV layout" in caplog.text
    other.kv.shutdown()
    # The other model's cache left the first one's files alone, and kept its own in a directory of its own.
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert {p.parent for p in slot_files(ssd_dir)} - {p.parent for p in before}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_write_errors_skip_the_store_and_nothing_breaks(make_ssd, engine: str, err: int) -> None:
    faults = FaultInjectingIoEnv(engine)
    env = make_ssd(engine, ssd_env=faults)
    kv, eng = env.kv, env.eng
    faults.fail_writes(err, 0, -1)
    tokens = env.tokens(4 * TPB)
    want = put_completely(env, tokens, range(4))
    assert kv.cache_stats()["ssd_write_errors"] >= 4
    # Still on CPU: loads fine.
    eng.poison()
    _, res = try_load(kv, tokens, range(10, 14))
    assert res.ok
    eng.assert_blocks(range(10, 14), want)
    faults.clear()
    push_out_of_cpu(env)
    # Off the CPU and never stored on SSD: a clean miss.
    task_id, mask = kv.get_match(tokens)
    assert not mask.any()
    assert kv.wait(task_id)[task_id].ok
    assert kv.lookup(tokens) == (0, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_read_errors_are_misses(make_ssd, engine: str) -> None:
    faults = FaultInjectingIoEnv(engine)
    env = make_ssd(engine, ssd_env=faults)
    tokens = _stored(env)
    faults.fail_reads(errno.EIO, 0, -1)
    env.eng.poison()
    _, res = try_load(env.kv, tokens, range(50, 54))
    assert not res.ok and not res.return_mask.any()
    env.eng.assert_poisoned(range(50, 54))
    assert env.kv.cache_stats()["ssd_read_errors"] >= 1


def test_torn_writes_are_caught_on_read(make_ssd) -> None:
    faults = FaultInjectingIoEnv("io_uring")
    env = make_ssd("io_uring", ssd_env=faults)
    faults.tear_writes(1)
    tokens = _stored(env, n=3)
    env.eng.poison()
    _, res = try_load(env.kv, tokens, range(50, 53))
    assert not res.ok
    hit = int(res.return_mask.sum()) // TPB
    assert hit < 3
    env.eng.assert_poisoned(range(50 + hit, 53))  # nothing past the torn block reached the engine
    assert env.kv.cache_stats()["ssd_mismatch_blocks"] >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_slot_file_that_cannot_be_opened_is_a_clear_error_at_start(make_ssd, engine: str, ssd_dir: Path) -> None:
    """The error names the key, the file and the cause; nothing stays half open: the directory is free again
    at once, and a cache on it works."""
    faults = FaultInjectingIoEnv(engine)
    faults.fail_open(errno.EACCES)
    with pytest.raises(ConfigError, match=r"cache_config\.ssd_cache_dir: cannot open SSD cache file .*"
                                          r"Permission denied") as exc:
        make_ssd(engine, ssd_env=faults)
    assert str(ssd_dir) in str(exc.value)
    env = make_ssd(engine)
    tokens = env.tokens(2 * TPB)
    want = put_completely(env, tokens, range(2))
    env.get_and_check(tokens, [5, 6], want)


def test_prefetch_brings_blocks_up_without_a_launch(make_ssd) -> None:
    env = make_ssd()
    kv = env.kv
    tokens = _stored(env)
    assert kv.lookup(tokens)[0] == 0
    task_id = kv.prefetch_async(tokens)
    assert kv.wait(task_id)[task_id].ok
    assert kv.lookup(tokens)[0] == 4 * TPB


def test_cancel_during_a_promotion_unlocks_everything(make_ssd) -> None:
    env = make_ssd()
    kv = env.kv
    tokens = _stored(env)
    task_id, mask = kv.get_match(tokens)
    assert mask.sum() == 4 * TPB
    kv.cancel(task_id)
    res = kv.wait(task_id)[task_id]
    assert res.status.value == "cancelled" and not res.return_mask.any()


def test_bad_directories_are_clear_errors_at_start(make_ssd, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=str(a_file)):
        make_ssd(ssd=[a_file], num_ssd_blocks=16)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    slot = 4096 + configs(head_size=HEAD)[0].block_bytes(TPB)
    with pytest.raises(ConfigError, match="num_ssd_blocks|space"):
        make_ssd(ssd=[tmp_path / "big"], num_ssd_blocks=int(free // slot) * 4)


def test_two_caches_never_share_a_directory(make_ssd) -> None:
    env = make_ssd()
    with pytest.raises(ConfigError, match="in use"):
        make_ssd()
    put_completely(env, env.tokens(2 * TPB), range(2))
    env.kv.shutdown()
    again = make_ssd()  # free again once the first has shut down
    assert again.kv.control_plane.ssd_restored == 2


def test_a_put_whose_prefix_another_put_is_storing_still_reaches_ssd(make_ssd) -> None:
    env = make_ssd(num_cpu_blocks=16)
    kv = env.kv
    tokens = env.tokens(8 * TPB)
    data = env.eng.fill(range(8))
    short_id, short_mask = kv.put_match(tokens[: 4 * TPB])   # blocks 0-3, still being stored
    long_id, long_mask = kv.put_match(tokens)                  # blocks 4-7 only
    assert short_mask.sum() == 4 * TPB and long_mask.sum() == 4 * TPB
    kv.launch(long_id, slots_for(long_mask, range(8), TPB))  # the longer one finishes first
    kv.launch(short_id, slots_for(short_mask, range(8), TPB))
    res = kv.wait([long_id, short_id], completely=True)
    assert res[long_id].ok and res[short_id].ok
    assert kv.lookup(tokens)[1] == 8 * TPB  # both halves are on SSD
    env.get_and_check(tokens, list(range(20, 28)), data)


def test_a_restart_scans_the_written_slots_and_copes_without_the_mark(make_ssd, ssd_dir: Path) -> None:
    env = make_ssd(num_ssd_blocks=10_000)
    put_completely(env, env.tokens(3 * TPB), range(3))
    env.kv.shutdown()
    (mark,) = ssd_dir.glob(".flexkv-*.watermark")
    assert 3 <= int(mark.read_text()) < 10_000  # a restart reads a few headers, not all 10000
    for _ in range(2):
        again = make_ssd(num_ssd_blocks=10_000)
        assert again.kv.control_plane.ssd_restored == 3
        again.kv.shutdown()
        mark.unlink()  # the second start has no mark: it scans every slot and finds the same blocks


def test_files_and_directories_flexkv_creates_are_owner_only(make_ssd, tmp_path: Path) -> None:
    """The slot files hold token ids of users' prompts: every file FlexKV creates under ssd_cache_dir is 0600,
    every directory it creates 0700; a directory that exists already is left as it is."""
    existing, created = tmp_path / "existing", tmp_path / "new" / "nested"
    existing.mkdir()
    existing.chmod(0o755)
    old = os.umask(0)  # the modes then come from FlexKV alone
    try:
        env = make_ssd(ssd=[existing, created], num_ssd_blocks=16)
        put_completely(env, env.tokens(3 * TPB), range(3))  # slot files, lock files, the written-slot mark
        env.kv.shutdown()
    finally:
        os.umask(old)
    files = [p for d in (existing, created) for p in d.rglob("*") if p.is_file()]
    dirs = [created.parent, created] + [p for d in (existing, created) for p in d.rglob("*") if p.is_dir()]
    assert {p.suffix for p in files} == {".dat", ".lock", ".watermark"} and len(dirs) == 4
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in files + dirs}
    assert all(modes[str(p)] == "0o600" for p in files) and all(modes[str(p)] == "0o700" for p in dirs), modes
    assert existing.stat().st_mode & 0o777 == 0o755
