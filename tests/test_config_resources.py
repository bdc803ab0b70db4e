"""flexkv.core.resources (do the tiers fit this machine's memory, memory cgroup, huge pages and disks),
describe, and the check-config command (flexkv.core.check_config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from flexkv.core import check_config
from flexkv.core import resources as resources_module
from flexkv.core.config import CacheConfig, ModelConfig, format_bytes, model_preset
from flexkv.core.config_file import load_config
from flexkv.core.errors import ConfigError
from flexkv.core.resources import check_resources, describe, require_resources

from kv_helpers import EXAMPLES, GiB, MiB, write, write_json

pytestmark = pytest.mark.usefixtures("no_flexkv_env")


def fake_resources(mem: int | None = 64 * GiB, cgroup: int | None = None, huge: int | None = 0,
                   disk: int | None = 1024 * GiB) -> dict:
    return {"mem_available": lambda: mem, "cgroup_room": lambda: cgroup, "hugepages_free": lambda: huge,
            "disk_free": lambda path: disk}


def test_resources_fit() -> None:
    cache = CacheConfig(num_cpu_blocks=100)
    assert check_resources(cache, model_preset("qwen-32b"), **fake_resources()) == []
    require_resources(cache, model_preset("qwen-32b"), **fake_resources())


def test_cpu_tier_too_big_for_memory() -> None:
    cache = CacheConfig(num_cpu_blocks=1000)  # 1000 x 4 MiB
    problems = check_resources(cache, model_preset("qwen-32b"), **fake_resources(mem=1 * GiB))
    assert len(problems) == 1
    msg = problems[0]
    assert "cache_config.num_cpu_blocks" in msg and "3.91 GiB" in msg and "MemAvailable 1 GiB" in msg
    assert "the largest num_cpu_blocks that fits is 256" in msg
    with pytest.raises(ConfigError) as e:
        require_resources(cache, model_preset("qwen-32b"), **fake_resources(mem=1 * GiB))
    assert e.value.key == "cache_config.num_cpu_blocks"


def test_cpu_tier_bounded_by_the_memory_cgroup() -> None:
    cache = CacheConfig(num_cpu_blocks=100)
    problems = check_resources(cache, model_preset("qwen-32b"), **fake_resources(cgroup=64 * MiB))
    assert len(problems) == 1 and "64 MiB left under the memory cgroup's limit" in problems[0]
    assert "docker run --memory" in problems[0] and "fits is 16" in problems[0]
    assert "--shm-size" not in problems[0]  # the memfd does not live in /dev/shm


def test_cpu_tier_is_not_bounded_by_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 64 MiB /dev/shm (Docker's default) and every other filesystem full: the CPU tier still fits in memory.
    asked: list[str] = []
    monkeypatch.setattr(resources_module, "read_disk_free", lambda path: asked.append(path) or 0)
    cache = CacheConfig(num_cpu_blocks=100)
    assert check_resources(cache, model_preset("qwen-32b"), mem_available=lambda: 64 * GiB,
                           cgroup_room=lambda: None) == []
    assert asked == []


def test_cpu_tier_in_free_huge_pages_fits_beyond_mem_available() -> None:
    model = model_preset("qwen-32b")  # 4 MiB blocks: 400 MiB for 100
    cache = CacheConfig(num_cpu_blocks=100, use_hugepage_cpu_buffer=True)
    assert check_resources(cache, model, **fake_resources(mem=100 * MiB, huge=512 * MiB)) == []
    problems = check_resources(cache, model, **fake_resources(mem=100 * MiB, huge=256 * MiB))
    assert len(problems) == 1 and "MemAvailable 100 MiB" in problems[0] and "HugePages_Free holds 256 MiB" \
        in problems[0]
    # Without use_hugepage_cpu_buffer free huge pages are not the tier's
    plain = dataclasses.replace(cache, use_hugepage_cpu_buffer=False)
    assert len(check_resources(plain, model, **fake_resources(mem=100 * MiB, huge=512 * MiB))) == 1


def test_cpu_tier_in_gib_names_cpu_cache_gb() -> None:
    cache = CacheConfig(cpu_cache_gb=8)
    with pytest.raises(ConfigError) as e:
        require_resources(cache, model_preset("qwen-32b"), **fake_resources(mem=3 * GiB + 5 * MiB))
    assert e.value.key == "cache_config.cpu_cache_gb"
    assert "the largest cpu_cache_gb that fits is 3" in str(e.value)


def test_ssd_tier_split_across_dirs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "not" / "yet" / "b"  # b does not exist: its nearest ancestor is asked
    a.mkdir()
    asked: list[str] = []

    def disk_free(path: str) -> int:
        asked.append(path)
        return 100 * MiB

    cache = CacheConfig(num_cpu_blocks=1, enable_ssd=True, num_ssd_blocks=20, ssd_cache_dir=f"{a};{b}")
    model = model_preset("qwen-32b")  # 4 MiB blocks: 80 MiB in all, 40 MiB per dir
    res = fake_resources()
    res["disk_free"] = disk_free
    assert check_resources(cache, model, **res) == []  # one filesystem, 100 MiB free, 80 MiB needed
    assert asked == [str(a)]  # both dirs sit on one filesystem: asked once, the needs add up
    big = dataclasses.replace(cache, num_ssd_blocks=30)  # 120 MiB on one filesystem
    problems = check_resources(big, model, **res)
    assert len(problems) == 1
    assert "cache_config.num_ssd_blocks" in problems[0] and "the largest num_ssd_blocks that fits is 24" in problems[0]
    # SSD is only checked when enabled
    assert check_resources(dataclasses.replace(big, enable_ssd=False), model, **res) == []


def test_ssd_nonexistent_dir_uses_nearest_ancestor(tmp_path: Path) -> None:
    asked: list[str] = []
    res = fake_resources()
    res["disk_free"] = lambda path: asked.append(path) or 10 * MiB
    cache = CacheConfig(num_cpu_blocks=1, enable_ssd=True, num_ssd_blocks=3, ssd_cache_dir=str(tmp_path / "x" / "y"))
    problems = check_resources(cache, model_preset("qwen-32b"), **res)
    assert asked == [str(tmp_path)]
    assert len(problems) == 1 and "fits is 2" in problems[0]


def test_ssd_dir_that_is_a_file(tmp_path: Path) -> None:
    f = write(tmp_path, "file", "x")
    cache = CacheConfig(num_cpu_blocks=1, enable_ssd=True, num_ssd_blocks=1, ssd_cache_dir=str(f / "sub"))
    problems = check_resources(cache, model_preset("tiny"), **fake_resources())
    assert problems and "cache_config.ssd_cache_dir" in problems[0]


def test_describe_without_model_says_how_to_give_one() -> None:
    text = describe(load_config(EXAMPLES / "single_node.json", env={}), None)
    assert "num_cpu_blocks" in text and "50000" in text and "evict_ratio" in text
    assert "model shape" in text and "--model" in text and "model_config" in text


def test_describe_with_model_lists_every_key_and_bytes() -> None:
    c = load_config(EXAMPLES / "short_form.json", env={})
    text = describe(c, model_preset("qwen-32b"), **fake_resources(mem=1 * GiB))
    for f in dataclasses.fields(CacheConfig):
        assert f.name in text
    assert "4194304 B" in text  # block bytes
    assert "32 GiB (8192 blocks x 4 MiB)" in text and "512 GiB (131072 blocks x 4 MiB)" in text
    assert "DO NOT FIT" in text and "cpu_cache_gb" in text


@pytest.fixture
def roomy_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources_module, "read_mem_available", lambda: 1024 * GiB)
    monkeypatch.setattr(resources_module, "read_cgroup_room", lambda: None)
    monkeypatch.setattr(resources_module, "read_hugepages_free", lambda: 0)
    monkeypatch.setattr(resources_module, "read_disk_free", lambda path: 1 << 50)


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources_module, "read_mem_available", lambda: 4 * GiB)
    monkeypatch.setattr(resources_module, "read_cgroup_room", lambda: 1 * GiB)
    monkeypatch.setattr(resources_module, "read_hugepages_free", lambda: 0)
    monkeypatch.setattr(resources_module, "read_disk_free", lambda path: 1 * GiB)


def test_check_config_good_file(capsys: pytest.CaptureFixture[str], roomy_machine: None) -> None:
    rc = check_config.main([str(EXAMPLES / "single_node.json"), "--model", "qwen-32b"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # the one warning: the example's SSD directory is not on this machine (the cache would create it)
    assert err.count("warning") == 1 and "'/data/flexkv_ssd/' does not exist" in err
    assert "single_node.json" in out
    assert "4 MiB (4194304 B" in out
    assert "195.31 GiB (50000 blocks x 4 MiB) in anonymous shared memory (memfd)" in out  # CPU tier
    assert "counted against MemAvailable and the memory cgroup, not /dev/shm" in out
    assert "781.25 GiB (200000 blocks x 4 MiB)" in out  # SSD tier
    assert "fit on this machine" in out


def test_check_config_bad_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_json(tmp_path, {"cache_config": {"num_cpu_block": 10}})
    rc = check_config.main([str(path)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "num_cpu_blocks" in err and "c.json" in err and "Traceback" not in err + out


def test_check_config_does_not_fit(capsys: pytest.CaptureFixture[str], small_machine: None) -> None:
    rc = check_config.main([str(EXAMPLES / "single_node.json"), "--model", "qwen-32b"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "cache_config.num_cpu_blocks" in err and "the largest num_cpu_blocks that fits is 256" in err
    assert "1 GiB left under the memory cgroup's limit" in err and "MemAvailable 4 GiB" in err
    assert "cache_config.num_ssd_blocks" in err
    # --skip-resources checks the file only
    assert check_config.main([str(EXAMPLES / "single_node.json"), "--model", "qwen-32b", "--skip-resources"]) == 0


def test_check_config_model_sources(capsys: pytest.CaptureFixture[str], roomy_machine: None, tmp_path: Path) -> None:
    # the file's model_config is used ...
    assert check_config.main([str(EXAMPLES / "cpu_only.json")]) == 0
    assert "16 KiB (16384 B" in capsys.readouterr().out
    # ... a preset replaces it, and single flags win over both
    assert check_config.main([str(EXAMPLES / "cpu_only.json"), "--model", "tiny", "--num-layers", "4",
                              "--dtype", "float32"]) == 0
    assert "64 KiB (65536 B" in capsys.readouterr().out
    # no model at all: exit 0 and say how to give one
    assert check_config.main([str(EXAMPLES / "large_scale.json")]) == 0
    assert "--model" in capsys.readouterr().out
    # an incomplete shape from flags alone is an error
    assert check_config.main([str(EXAMPLES / "large_scale.json"), "--num-layers", "4"]) == 1
    assert "--num-kv-heads" in capsys.readouterr().err
    assert check_config.main([str(EXAMPLES / "large_scale.json"), "--model", "nope"]) == 1
    assert "presets" in capsys.readouterr().err
    assert check_config.main([str(EXAMPLES / "large_scale.json"), "--model", "tiny", "--dtype", "float64"]) == 1
    assert "model_config.dtype" in capsys.readouterr().err


def test_check_config_env_and_default_path(capsys: pytest.CaptureFixture[str], roomy_machine: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(EXAMPLES / "cpu_only.json"))
    monkeypatch.setenv("FLEXKV_NUM_CPU_BLOCKS", "10")
    assert check_config.main([]) == 0
    out = capsys.readouterr().out
    assert "cpu_only.json" in out and "FLEXKV_NUM_CPU_BLOCKS" in out and "160 KiB (10 blocks" in out
    monkeypatch.setenv("FLEXKV_EVICT_RATIO", "7")
    assert check_config.main([]) == 1
    assert "FLEXKV_EVICT_RATIO" in capsys.readouterr().err


def test_check_config_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config.main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out
    assert check_config.main(["--num-layers", "x"]) == 2


def test_cpu_tier_need_counts_page_aligned_blocks_when_ssd_is_on(tmp_path: Path) -> None:
    model = ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float16")  # 512-byte blocks
    plain = CacheConfig(num_cpu_blocks=1000, tokens_per_block=16)
    with_ssd = CacheConfig(num_cpu_blocks=1000, tokens_per_block=16, enable_ssd=True, num_ssd_blocks=10,
                           ssd_cache_dir=str(tmp_path))
    readers = {"mem_available": lambda: 1 << 20, "cgroup_room": lambda: None, "disk_free": lambda p: 1 << 40}
    assert resources_module.check_resources(plain, model, **readers) == []  # 1000 x 512 B fit in 1 MiB
    problems = resources_module.check_resources(with_ssd, model, **readers)  # 1000 x 4 KiB do not
    assert len(problems) == 1 and "num_cpu_blocks" in problems[0] and "largest num_cpu_blocks that fits is 256" \
        in problems[0]


def test_check_config_predicts_what_runs(capsys: pytest.CaptureFixture[str], roomy_machine: None,
                                          tmp_path: Path) -> None:
    ssd = tmp_path / "missing" / "ssd"
    path = write_json(tmp_path, {"model_config": {"num_layers": 24, "num_kv_heads": 2, "head_size": 64},
                                 "cache_config": {"tokens_per_block": 16, "cpu_cache_gb": 1, "enable_ssd": True,
                                                  "num_ssd_blocks": 100, "ssd_cache_dir": str(ssd)}})
    assert check_config.main([str(path), "--engine", "vllm", "--block-size", "32"]) == 0
    out, err = capsys.readouterr()
    # vLLM's block size replaces tokens_per_block: 1 GiB holds half the blocks, each twice the bytes
    assert "tokens_per_block             = 32" in out and "(2730 blocks x 384 KiB)" in out
    assert "engine: vllm runs tokens_per_block = 32 (its block size), not 16" in out
    assert "this version runs: CPU + SSD (tiers in this version: CPU, SSD, remote)" in out
    slot = check_config.ssd_slot_bytes(384 * 1024, 32)
    assert slot == 388 * 1024 and f"100 slots x {format_bytes(slot)}" in out  # a header per slot
    assert f"ssd_cache_dir '{ssd}' does not exist: the cache creates it" in err
    assert "replaced" not in err  # said once, in the note
    assert check_config.main([str(path), "--block-size", "32"]) == 1
    assert "--block-size needs --engine" in capsys.readouterr().err


def test_check_config_warns_on_what_is_ignored_or_refused(capsys: pytest.CaptureFixture[str], roomy_machine: None,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_json(tmp_path, {"cache_config": {"num_cpu_blocks": 10, "num_ssd_blocks": 100,
                                                  "num_remote_blocks": 10}})
    assert check_config.main([str(path)]) == 0
    err = capsys.readouterr().err
    assert "num_ssd_blocks is ignored: enable_ssd is false" in err
    assert "the remote_* keys are ignored: enable_remote is false" in err
    path = write_json(tmp_path, {"cache_config": {"num_cpu_blocks": 10, "enable_ssd": True, "num_ssd_blocks": 10,
                                                  "ssd_cache_dir": str(tmp_path / "ssd_${worker_id}")}})
    monkeypatch.delenv("worker_id", raising=False)
    assert check_config.main([str(path)]) == 1
    assert "the environment variable worker_id is not set" in capsys.readouterr().err
    monkeypatch.setenv("worker_id", "7")
    assert check_config.main([str(path)]) == 0
    assert f"cache_config.ssd_cache_dir = {str(tmp_path / 'ssd_7')!r}" in capsys.readouterr().out


def test_check_config_prints_each_error_once(capsys: pytest.CaptureFixture[str], small_machine: None) -> None:
    assert check_config.main([str(EXAMPLES / "single_node.json"), "--model", "qwen-32b"]) == 1
    out, err = capsys.readouterr()
    assert "DO NOT FIT" in out and "the largest num_cpu_blocks" not in out
    assert err.count("the largest num_cpu_blocks that fits") == 1


def test_ssd_slot_bytes_match_the_ssd_tier(make_kv) -> None:
    env = make_kv(ssd=True, head_size=64)
    kv = env.kv
    assert check_config.ssd_slot_bytes(kv.block_bytes, kv.tokens_per_block) == kv.control_plane.ssd_slot_bytes
