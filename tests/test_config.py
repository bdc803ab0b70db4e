"""Tests of flexkv.core.config (the config model), config_file (loader, env overrides), resources, check-config."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from flexkv.core import check_config
from flexkv.core import resources as resources_module
from flexkv.core.config import MODEL_PRESETS, CacheConfig, FlexKVConfig, ModelConfig, model_preset
from flexkv.core.config_file import load_config, strip_json_comments
from flexkv.core.errors import ConfigError, FlexKVError
from flexkv.core.resources import check_resources, describe, require_resources

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
# The manual sits in the workspace's shared/ folder, beside the checkout or beside the worktrees' folder.
SEED = next((d / "shared" / "seed" / "000_19ded2a00a39b9cb.txt" for d in (ROOT.parent, ROOT.parent.parent)
             if (d / "shared" / "seed").is_dir()), ROOT.parent / "shared" / "seed" / "000_19ded2a00a39b9cb.txt")
GiB = 1024**3
MiB = 1024**2

# The three JSON blocks of the manual's chapter 17, exactly as printed (17.1.2, 17.2.2, 17.4.2).
MANUAL_SINGLE_NODE = """{
    "server_recv_port": "ipc:///tmp/flexkv_test",
    "cache_config": {
        "enable_cpu": true,
        "enable_ssd": true,
        "enable_remote": false,
        "tokens_per_block": 16,
        "num_cpu_blocks": 50000,   // 约 400GB CPU 内存
        "num_ssd_blocks": 200000,  // 约 1.6TB SSD
        "ssd_cache_dir": "/data/flexkv_ssd/",
        "evict_ratio": 0.05,
        "use_ce_transfer_h2d": true,
        "use_ce_transfer_d2h": true,
        "transfer_sms_h2d": 8,
        "ssd_cache_iouring_entries": 512
    }
}
"""

MANUAL_DISTRIBUTED_WORKER = """{
    "server_recv_port": "ipc:///tmp/flexkv_${worker_id}_test",
    "cache_config": {
        "enable_cpu": true,
        "enable_ssd": true,
        "enable_remote": true,
        "tokens_per_block": 64,
        "num_cpu_blocks": 200000,
        "num_ssd_blocks": 2000000,
        "num_remote_blocks": 20000000,
        "ssd_cache_dir": "/data/flexkv_ssd/",
        "remote_cache_path": "s3://flexkv-cache/",
        "evict_ratio": 0.05,
        "remote_config_custom": {
            "endpoint": "s3.amazonaws.com",
            "bucket": "flexkv-cache"
        }
    }
}
"""

MANUAL_LARGE_SCALE = """{
    "cache_config": {
        "tokens_per_block": 64,        // 大 Block，减少传输
        "num_cpu_blocks": 500000,      // 大容量 CPU 缓存
        "num_ssd_blocks": 5000000,     // 大容量 SSD 缓存
        "evict_ratio": 0.0,            // 不淘汰
        "use_ce_transfer_h2d": true,   // 启用 Copy Engine
        "transfer_sms_h2d": 16,        // 增加 SM
        "ssd_cache_iouring_entries": 1024  // 大 I/O 队列
    }
}
"""

MANUAL_BLOCKS = {
    "single_node.json": MANUAL_SINGLE_NODE,
    "distributed_worker.json": MANUAL_DISTRIBUTED_WORKER,
    "large_scale.json": MANUAL_LARGE_SCALE,
}

QWEN_BLOCK_16 = 64 * 2 * 8 * 128 * 2 * 16  # layers * k|v * heads * head_size * bf16 * tokens = 4 MiB


@pytest.fixture(autouse=True)
def _no_flexkv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment must not leak FLEXKV_* overrides into load_config / check_config."""
    import os

    for name in list(os.environ):
        if name.startswith("FLEXKV_"):
            monkeypatch.delenv(name)


@pytest.fixture
def flexkv_log() -> list[logging.LogRecord]:
    """Records logged on the "flexkv" logger (a handler on the logger itself, whatever its propagation)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("flexkv")
    handler = _Keep(level=logging.DEBUG)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path: Path, data: object, name: str = "c.json") -> Path:
    return write(tmp_path, name, json.dumps(data))


def fake_resources(mem: int | None = 64 * GiB, shm: int | None = 64 * GiB, disk: int | None = 1024 * GiB) -> dict:
    return {"mem_available": lambda: mem, "shm_free": lambda: shm, "disk_free": lambda path: disk}


# ------------------------------------------------------------------------------------------------
# the example files and the manual
# ------------------------------------------------------------------------------------------------

EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml", ".yml"))


def test_examples_present() -> None:
    expected = {"single_node.json", "distributed_worker.json", "large_scale.json", "short_form.json",
                "short_form.yaml", "cpu_only.json"}
    assert expected <= set(EXAMPLE_FILES)
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in expected:
        assert name in readme


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_example_loads_and_validates(name: str) -> None:
    config = load_config(EXAMPLES / name, env={})
    assert isinstance(config, FlexKVConfig)
    config.validate()
    # every example resolves to block counts with a model shape
    resolved = config.cache_config.resolved(MODEL_PRESETS["qwen-32b"]).validate()
    assert resolved.num_cpu_blocks >= 1


@pytest.mark.parametrize("name", sorted(MANUAL_BLOCKS))
def test_manual_examples_are_verbatim_copies(name: str) -> None:
    assert (EXAMPLES / name).read_bytes() == MANUAL_BLOCKS[name].encode("utf-8")


def _seed_json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", SEED.read_text(encoding="utf-8"), re.S)


@pytest.mark.skipif(not SEED.exists(), reason="the manual (shared/seed) is not in this checkout")
def test_manual_blocks_match_embedded_copies() -> None:
    blocks = _seed_json_blocks()
    assert blocks == [MANUAL_SINGLE_NODE, MANUAL_DISTRIBUTED_WORKER, MANUAL_LARGE_SCALE]


@pytest.mark.skipif(not SEED.exists(), reason="the manual (shared/seed) is not in this checkout")
def test_every_manual_json_block_loads_as_printed(tmp_path: Path) -> None:
    blocks = _seed_json_blocks()
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        assert "//" in block
        config = load_config(write(tmp_path, f"manual_{i}.json", block), env={})
        assert config.cache_config.num_cpu_blocks in (50000, 200000, 500000)


def test_single_node_values() -> None:
    c = load_config(EXAMPLES / "single_node.json", env={})
    assert c.server_recv_port == "ipc:///tmp/flexkv_test"
    cc = c.cache_config
    assert (cc.num_cpu_blocks, cc.num_ssd_blocks, cc.tokens_per_block) == (50000, 200000, 16)
    assert cc.enable_cpu and cc.enable_ssd and not cc.enable_remote
    assert cc.ssd_cache_dir == "/data/flexkv_ssd/"
    assert cc.ssd_cache_dirs == ["/data/flexkv_ssd/"]
    assert cc.evict_ratio == 0.05
    assert cc.use_ce_transfer_h2d is True and cc.use_ce_transfer_d2h is True
    assert cc.transfer_sms_h2d == 8 and cc.ssd_cache_iouring_entries == 512
    assert c.model_config is None
    assert c.enable_flexkv is True and c.num_log_interval_requests == 200


def test_distributed_worker_values() -> None:
    c = load_config(EXAMPLES / "distributed_worker.json", env={})
    assert c.server_recv_port == "ipc:///tmp/flexkv_${worker_id}_test"
    cc = c.cache_config
    assert cc.enable_remote and cc.num_remote_blocks == 20000000
    assert cc.remote_cache_path == "s3://flexkv-cache/"
    assert cc.remote_config_custom == {"endpoint": "s3.amazonaws.com", "bucket": "flexkv-cache"}
    assert (cc.tokens_per_block, cc.num_cpu_blocks, cc.num_ssd_blocks) == (64, 200000, 2000000)


def test_large_scale_values() -> None:
    c = load_config(EXAMPLES / "large_scale.json", env={})
    cc = c.cache_config
    assert c.server_recv_port == "ipc:///tmp/flexkv_server"
    assert (cc.tokens_per_block, cc.num_cpu_blocks, cc.num_ssd_blocks) == (64, 500000, 5000000)
    assert cc.evict_ratio == 0.0 and cc.use_ce_transfer_h2d is True and cc.use_ce_transfer_d2h is False
    assert cc.transfer_sms_h2d == 16 and cc.ssd_cache_iouring_entries == 1024
    assert cc.enable_ssd is False  # the manual does not enable it there


def test_short_form_json_with_model_computes_blocks_exactly() -> None:
    c = load_config(EXAMPLES / "short_form.json", env={})
    assert c.cache_config.cpu_cache_gb == 32 and c.cache_config.ssd_cache_gb == 512
    model = model_preset("qwen-32b")
    assert model.block_bytes(16) == QWEN_BLOCK_16 == 4 * MiB
    r = c.cache_config.resolved(model)
    assert r.num_cpu_blocks == 32 * GiB // QWEN_BLOCK_16 == 8192
    assert r.num_ssd_blocks == 512 * GiB // QWEN_BLOCK_16 == 131072
    assert r.enable_ssd is True
    assert r.cpu_cache_gb is None and r.ssd_cache_gb is None
    assert c.cache_config.num_cpu_blocks == 1000000  # the loaded config itself is unchanged


def test_short_form_yaml() -> None:
    c = load_config(EXAMPLES / "short_form.yaml", env={})
    assert c.cache_config.ssd_cache_dir == ["/data/nvme0/flexkv_ssd", "/data/nvme1/flexkv_ssd"]
    assert c.cache_config.cpu_cache_gb == 32


def test_cpu_only_example_uses_tiny_preset() -> None:
    c = load_config(EXAMPLES / "cpu_only.json", env={})
    assert c.model_config == MODEL_PRESETS["tiny"]
    assert not c.cache_config.enable_ssd
    assert c.cache_config.num_cpu_blocks * c.model_config.block_bytes(16) <= 32 * MiB


def test_short_form_with_odd_gb_and_long_form_mix(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"server_recv_port": "tcp://127.0.0.1:5555", "cpu_cache_gb": 1.5,
                                 "cache_config": {"tokens_per_block": 32, "ssd_cache_gb": 0.001,
                                                  "ssd_cache_dir": str(tmp_path)},
                                 "model_config": {"num_layers": 3, "num_kv_heads": 5, "head_size": 96,
                                                  "dtype": "float32"}})
    c = load_config(path, env={})
    block = 32 * 3 * 2 * 5 * 96 * 4
    assert c.model_config.block_bytes(32) == block
    r = c.resolved_cache()
    assert r.num_cpu_blocks == int(1.5 * GiB // block)
    assert r.num_ssd_blocks == int(0.001 * GiB // block) and r.enable_ssd


# ------------------------------------------------------------------------------------------------
# parsing: comments, errors naming the file
# ------------------------------------------------------------------------------------------------

def test_strip_comments_keeps_slashes_inside_strings() -> None:
    text = ('{"a": "ipc:///tmp/x", // comment "with quotes"\n'
            ' "b": "s3://bucket/", "c": "q\\" // still a string", /* block\n comment */ "d": 1}\n')
    stripped = strip_json_comments(text)
    assert len(stripped) == len(text) and stripped.count("\n") == text.count("\n")
    assert json.loads(stripped) == {"a": "ipc:///tmp/x", "b": "s3://bucket/", "c": 'q" // still a string', "d": 1}


def test_json_comment_after_last_value_and_slashes_in_values(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{\n  "server_recv_port": "ipc:///tmp/a//b", // port\n'
                                     '  "cache_config": {"remote_cache_path": "s3://x//y/"  // path\n  }\n}\n')
    c = load_config(path, env={})
    assert c.server_recv_port == "ipc:///tmp/a//b"
    assert c.cache_config.remote_cache_path == "s3://x//y/"


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '{\n  "cache_config": {\n    "num_cpu_blocks": 10 // c\n    "x": 1\n  }\n}\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert "bad.json" in msg and "line 4" in msg and "column 5" in msg


def test_trailing_comma_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{"cache_config": {"num_cpu_blocks": 10,  // last\n}}')
    with pytest.raises(ConfigError, match="trailing comma"):
        load_config(path, env={})


def test_duplicate_json_key(tmp_path: Path) -> None:
    path = write(tmp_path, "c.json", '{"cache_config": {"num_cpu_blocks": 10, "num_cpu_blocks": 20}}')
    with pytest.raises(ConfigError, match="num_cpu_blocks.*twice"):
        load_config(path, env={})


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "cache_config:\n  num_cpu_blocks: 10\n bad: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert "c.yaml" in str(e.value) and "YAML" in str(e.value) and "line" in str(e.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.json.*does not exist"):
        load_config(tmp_path / "nope.json", env={})
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})
    with pytest.raises(ConfigError, match="FLEXKV_CONFIG_PATH"):
        load_config(env={"FLEXKV_CONFIG_PATH": str(tmp_path / "gone.yaml")})


def test_non_object_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must hold an object"):
        load_config(write(tmp_path, "c.json", "[1, 2]"), env={})
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, "c.yaml", "# nothing\n"), env={})
    with pytest.raises(ConfigError, match="cache_config must be an object"):
        load_config(write(tmp_path, "d.json", '{"cache_config": 5}'), env={})


def test_other_extension_tries_json_then_yaml(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, "flexkv.conf", '{"cache_config": {"num_cpu_blocks": 7}} // x'), env={})
    assert c.cache_config.num_cpu_blocks == 7
    c = load_config(write(tmp_path, "flexkv.cfg", "cache_config:\n  num_cpu_blocks: 9\n"), env={})
    assert c.cache_config.num_cpu_blocks == 9
    with pytest.raises(ConfigError, match="neither JSON nor YAML"):
        load_config(write(tmp_path, "flexkv.txt", "{a: [\n"), env={})


# ------------------------------------------------------------------------------------------------
# unknown keys, wrong types, ranges
# ------------------------------------------------------------------------------------------------

def test_unknown_key_in_cache_config_suggests(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"cache_config": {"num_cpu_block": 10}})
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    msg = str(e.value)
    assert e.value.key == "cache_config.num_cpu_block"
    assert "did you mean num_cpu_blocks" in msg
    assert "tokens_per_block" in msg and "ssd_cache_iouring_entries" in msg  # the list of valid keys
    assert "c.json" in msg


def test_unknown_key_at_top_level_suggests(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"num_cpu_block": 10})
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert e.value.key == "num_cpu_block"
    assert "did you mean cache_config.num_cpu_blocks" in str(e.value)
    assert "server_recv_port" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean server_recv_port"):
        load_config(write_json(tmp_path, {"server_recv_prot": "ipc:///x"}), env={})
    with pytest.raises(ConfigError, match="did you mean num_layers"):
        load_config(write_json(tmp_path, {"model_config": {"num_layer": 2}}), env={})


def test_misplaced_keys_say_where_they_belong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="belongs in cache_config"):
        load_config(write_json(tmp_path, {"num_cpu_blocks": 10}), env={})
    with pytest.raises(ConfigError, match="belongs at the top level"):
        load_config(write_json(tmp_path, {"cache_config": {"server_recv_port": "ipc:///x"}}), env={})
    with pytest.raises(ConfigError, match="belongs in model_config"):
        load_config(write_json(tmp_path, {"cache_config": {"num_layers": 2}}), env={})


@pytest.mark.parametrize(("section", "key", "value", "expect"), [
    ("cache_config", "tokens_per_block", "16", "without quotes"),
    ("cache_config", "num_cpu_blocks", True, "an integer"),
    ("cache_config", "num_cpu_blocks", 1e5, "write 100000"),
    ("cache_config", "enable_ssd", 1, "true or false"),
    ("cache_config", "evict_ratio", "0.1", "a number"),
    ("cache_config", "evict_ratio", False, "a number"),
    ("cache_config", "ssd_cache_dir", ["/a", 3], "a list of strings"),
    ("cache_config", "remote_config_custom", "x", "an object"),
    (None, "server_recv_port", 5555, "a string"),
    (None, "cpu_cache_gb", "32", "a number"),
    ("model_config", "num_layers", "64", "an integer"),
    ("model_config", "use_mla", 0, "true or false"),
    ("model_config", "dtype", 2, "a string"),
])
def test_wrong_types_name_key_type_and_value(tmp_path: Path, section: str | None, key: str, value: object,
                                             expect: str) -> None:
    data = {key: value} if section is None else {section: {key: value}}
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path, data), env={})
    full = key if section is None else f"{section}.{key}"
    assert e.value.key == full
    assert full in str(e.value) and expect in str(e.value) and repr(value) in str(e.value)


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    c = load_config(write_json(tmp_path, {"cpu_cache_gb": 2, "cache_config": {"evict_ratio": 1}}), env={})
    assert c.cache_config.evict_ratio == 1 and c.cache_config.cpu_cache_gb == 2


@pytest.mark.parametrize(("values", "key", "hint"), [
    ({"evict_ratio": 1.5}, "cache_config.evict_ratio", "[0, 1]"),
    ({"evict_ratio": -0.1}, "cache_config.evict_ratio", "[0, 1]"),
    ({"tokens_per_block": 0}, "cache_config.tokens_per_block", ">= 1"),
    ({"num_cpu_blocks": 0}, "cache_config.num_cpu_blocks", ">= 1"),
    ({"enable_ssd": True, "num_ssd_blocks": 0, "ssd_cache_dir": "/x"}, "cache_config.num_ssd_blocks", ">= 1"),
    ({"transfer_sms_h2d": 0}, "cache_config.transfer_sms_h2d", "[1, 256]"),
    ({"transfer_sms_d2h": 257}, "cache_config.transfer_sms_d2h", "[1, 256]"),
    ({"ssd_cache_iouring_entries": 0}, "cache_config.ssd_cache_iouring_entries", ">= 1"),
    ({"eviction_policy": "fifo"}, "cache_config.eviction_policy", "lru"),
    ({"cpu_cache_gb": 0}, "cache_config.cpu_cache_gb", "> 0"),
    ({"ssd_cache_gb": -1}, "cache_config.ssd_cache_gb", ">= 0"),
    ({"enable_cpu": False}, "cache_config.enable_cpu", "set enable_cpu to true"),
    ({"enable_remote": True}, "cache_config.num_remote_blocks", "required"),
    ({"enable_ssd": True}, "cache_config.ssd_cache_dir", "required"),
])
def test_out_of_range_values(tmp_path: Path, values: dict, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path, {"cache_config": values}), env={})
    assert e.value.key == key
    assert key in str(e.value) and hint in str(e.value)
    # the dataclass says the same when built directly
    with pytest.raises(ConfigError) as e2:
        CacheConfig(**values).validate()
    assert e2.value.key == key


def test_out_of_range_message_names_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cache_config\.evict_ratio = 1\.5 .*0\.05"):
        load_config(write_json(tmp_path, {"cache_config": {"evict_ratio": 1.5}}), env={})


def test_model_config_range_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path, {"model_config": {"num_layers": 0}}), env={})
    assert e.value.key == "model_config.num_layers"
    with pytest.raises(ConfigError, match="model_config.dtype.*bfloat16"):
        load_config(write_json(tmp_path, {"model_config": {"dtype": "float64"}}), env={})


def test_server_recv_port_must_be_an_endpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ZeroMQ endpoint"):
        load_config(write_json(tmp_path, {"server_recv_port": "/tmp/flexkv"}), env={})


@pytest.mark.parametrize("data", [
    {"cpu_cache_gb": 32, "cache_config": {"num_cpu_blocks": 5000}},
    {"cache_config": {"num_cpu_blocks": 5000, "cpu_cache_gb": 32}},
])
def test_cpu_cache_gb_and_num_cpu_blocks_both_given(tmp_path: Path, data: dict) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write_json(tmp_path, data), env={})
    msg = str(e.value)
    assert "num_cpu_blocks" in msg and "cpu_cache_gb" in msg and "drop" in msg


def test_ssd_cache_gb_and_num_ssd_blocks_both_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="drop"):
        load_config(write_json(tmp_path, {"ssd_cache_gb": 10, "cache_config": {"num_ssd_blocks": 5}}), env={})


def test_short_key_given_twice(tmp_path: Path) -> None:
    data = {"ssd_cache_dir": "/a", "cache_config": {"ssd_cache_dir": "/b"}}
    with pytest.raises(ConfigError, match="both at the top level and in cache_config"):
        load_config(write_json(tmp_path, data), env={})


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------

def test_env_overrides_each_type(tmp_path: Path) -> None:
    path = EXAMPLES / "single_node.json"
    env = {
        "FLEXKV_NUM_CPU_BLOCKS": "1000",
        "FLEXKV_ENABLE_SSD": "No",
        "FLEXKV_USE_CE_TRANSFER_D2H": "0",
        "FLEXKV_ENABLE_REMOTE": "ON",
        "FLEXKV_NUM_REMOTE_BLOCKS": "77",
        "FLEXKV_EVICT_RATIO": "0.1",
        "FLEXKV_SSD_CACHE_DIR": "/a;/b",
        "FLEXKV_REMOTE_CONFIG_CUSTOM": '{"k": 1}',
        "FLEXKV_SERVER_RECV_PORT": "tcp://127.0.0.1:6000",
        "FLEXKV_EVICTION_POLICY": "lru",
    }
    c = load_config(path, env=env)
    cc = c.cache_config
    assert cc.num_cpu_blocks == 1000 and cc.num_ssd_blocks == 200000
    assert cc.enable_ssd is False and cc.use_ce_transfer_d2h is False and cc.enable_remote is True
    assert cc.num_remote_blocks == 77
    assert cc.evict_ratio == 0.1
    assert cc.ssd_cache_dir == ["/a", "/b"]
    assert cc.remote_config_custom == {"k": 1}
    assert c.server_recv_port == "tcp://127.0.0.1:6000"


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("YES", True), ("On", True),
                                                ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_env_bool_spellings(text: str, expected: bool) -> None:
    c = load_config(env={"FLEXKV_USE_HUGEPAGE_CPU_BUFFER": text})
    assert c.cache_config.use_hugepage_cpu_buffer is expected


def test_env_without_file_and_optional_none() -> None:
    c = load_config(env={"FLEXKV_CPU_CACHE_GB": "4", "FLEXKV_NUM_REMOTE_BLOCKS": "none"})
    assert c.cache_config.cpu_cache_gb == 4.0 and c.cache_config.num_remote_blocks is None
    assert c == FlexKVConfig(cache_config=CacheConfig(cpu_cache_gb=4.0))


@pytest.mark.parametrize(("var", "value", "expect"), [
    ("FLEXKV_NUM_CPU_BLOCKS", "lots", "an integer"),
    ("FLEXKV_NUM_CPU_BLOCKS", "1.5", "an integer"),
    ("FLEXKV_ENABLE_SSD", "maybe", "true or false"),
    ("FLEXKV_EVICT_RATIO", "abc", "a number"),
    ("FLEXKV_EVICT_RATIO", "nan", "finite"),
    ("FLEXKV_REMOTE_CONFIG_CUSTOM", "{bad", "not valid JSON"),
    ("FLEXKV_REMOTE_CONFIG_CUSTOM", "[1]", "a JSON object"),
])
def test_bad_env_values_name_the_variable(var: str, value: str, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(env={var: value})
    assert var in str(e.value) and expect in str(e.value)


def test_env_value_out_of_range_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(EXAMPLES / "single_node.json", env={"FLEXKV_EVICT_RATIO": "2"})
    assert e.value.key == "cache_config.evict_ratio"
    assert "FLEXKV_EVICT_RATIO" in str(e.value)


def test_env_size_replaces_the_files_other_size(flexkv_log: list[logging.LogRecord]) -> None:
    model = model_preset("qwen-32b")
    c = load_config(EXAMPLES / "short_form.json", env={"FLEXKV_NUM_CPU_BLOCKS": "100"})
    assert c.cache_config.cpu_cache_gb is None and c.cache_config.num_cpu_blocks == 100
    assert c.cache_config.resolved(model).num_cpu_blocks == 100
    c = load_config(EXAMPLES / "single_node.json", env={"FLEXKV_CPU_CACHE_GB": "8"})
    assert c.cache_config.resolved(model).num_cpu_blocks == 8 * GiB // QWEN_BLOCK_16
    with pytest.raises(ConfigError) as e:
        load_config(env={"FLEXKV_NUM_CPU_BLOCKS": "100", "FLEXKV_CPU_CACHE_GB": "8"})
    assert "FLEXKV_NUM_CPU_BLOCKS" in str(e.value) and "FLEXKV_CPU_CACHE_GB" in str(e.value)


def test_reserved_env_ignored_and_unknown_env_warns(flexkv_log: list[logging.LogRecord], tmp_path: Path) -> None:
    env = {"FLEXKV_CONFIG_PATH": "", "FLEXKV_LOG_LEVEL": "DEBUG", "FLEXKV_TEST_ANYTHING": "x",
           "OTHER": "1"}
    assert load_config(env=env) == FlexKVConfig()
    assert not [r for r in flexkv_log if r.levelno >= logging.WARNING]
    c = load_config(env={"FLEXKV_NUM_CPU_BLOCK": "5"})
    assert c.cache_config.num_cpu_blocks == 1000000  # not applied, not fatal
    warnings = [r.getMessage() for r in flexkv_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "FLEXKV_NUM_CPU_BLOCK" in warnings[0] and "did you mean FLEXKV_NUM_CPU_BLOCKS" in warnings[0]


def test_flexkv_config_path_used_when_path_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = write_json(tmp_path, {"cache_config": {"num_cpu_blocks": 4242}})
    monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(path))
    assert load_config().cache_config.num_cpu_blocks == 4242
    monkeypatch.setenv("FLEXKV_NUM_CPU_BLOCKS", "17")
    assert load_config().cache_config.num_cpu_blocks == 17
    # the env argument replaces os.environ entirely
    assert load_config(env={}).cache_config.num_cpu_blocks == 1000000
    assert load_config(env={"FLEXKV_CONFIG_PATH": str(path)}).cache_config.num_cpu_blocks == 4242


def test_defaults_without_file_or_env() -> None:
    c = load_config(env={})
    assert c == FlexKVConfig()
    assert c.server_recv_port == "ipc:///tmp/flexkv_server" and c.model_config is None
    assert c.cache_config == CacheConfig()


# ------------------------------------------------------------------------------------------------
# the dataclasses
# ------------------------------------------------------------------------------------------------

def test_cache_config_defaults_match_upstream() -> None:
    c = CacheConfig()
    assert (c.tokens_per_block, c.num_cpu_blocks, c.num_ssd_blocks) == (16, 1000000, 10000000)
    assert c.enable_cpu and not c.enable_ssd and not c.enable_remote and c.num_remote_blocks is None
    assert (c.transfer_sms_h2d, c.transfer_sms_d2h, c.ssd_cache_iouring_entries) == (8, 8, 512)
    assert c.eviction_policy == "lru" and c.evict_ratio == 0.0
    assert CacheConfig(ssd_cache_dir="/a; /b;").ssd_cache_dir == ["/a", "/b"]
    assert CacheConfig().validate() is not None


def test_model_dtypes_and_bytes() -> None:
    assert ModelConfig().dtype_name == "bfloat16"
    cases = {"bfloat16": 2, "bf16": 2, "float16": 2, "FP16": 2, "float32": 4, "fp8": 1, "float8_e4m3fn": 1,
             "int8": 1, np.float16: 2, np.dtype("float32"): 4, np.int8: 1}
    for dtype, size in cases.items():
        assert ModelConfig(dtype=dtype).itemsize == size, dtype
    assert ModelConfig(dtype="fp8").dtype_name == "float8_e4m3fn"
    m = ModelConfig(num_layers=64, num_kv_heads=8, head_size=128)
    assert m.kv_dim == 2 and m.bytes_per_token_per_layer == 4096 and m.token_size_in_bytes == 262144
    assert m.block_bytes(16) == QWEN_BLOCK_16
    mla = ModelConfig(num_layers=61, num_kv_heads=1, head_size=576, use_mla=True)
    assert mla.kv_dim == 1 and mla.block_bytes(64) == 61 * 576 * 2 * 64
    with pytest.raises(ConfigError, match="model_config.dtype"):
        ModelConfig(dtype="float64").validate()
    with pytest.raises(ConfigError, match="model_config.head_size"):
        ModelConfig(head_size=0).validate()
    with pytest.raises(ConfigError, match="model_config.tp_size"):
        ModelConfig(tp_size=True).validate()


def test_model_torch_dtype() -> None:
    torch = pytest.importorskip("torch")
    m = ModelConfig(dtype=torch.bfloat16)
    assert m.dtype_name == "bfloat16" and m.itemsize == 2
    assert ModelConfig(dtype=torch.float8_e4m3fn).itemsize == 1
    assert ModelConfig(dtype=torch.half).dtype_name == "float16"
    assert ModelConfig(dtype="fp16").torch_dtype() is torch.float16
    assert m.fingerprint() == ModelConfig(dtype="bfloat16").fingerprint()


def test_fingerprint_is_stable_and_sensitive() -> None:
    base = ModelConfig(num_layers=64, num_kv_heads=8, head_size=128)
    assert base.fingerprint() == ModelConfig(num_layers=64, num_kv_heads=8, head_size=128, dtype="bf16").fingerprint()
    assert base.fingerprint() == ModelConfig(num_layers=64, num_kv_heads=8, head_size=128, dp_size=2).fingerprint()
    variants = [dict(dtype="float16"), dict(num_kv_heads=4), dict(head_size=64), dict(num_layers=32),
                dict(use_mla=True), dict(tp_size=2)]
    prints = {dataclasses.replace(base, **v).fingerprint() for v in variants}
    assert len(prints) == len(variants) and base.fingerprint() not in prints
    assert "bfloat16" in base.fingerprint()


def test_presets() -> None:
    assert MODEL_PRESETS["qwen-32b"] == ModelConfig(64, 8, 128, False, "bfloat16")
    assert MODEL_PRESETS["llama-70b"] == ModelConfig(80, 8, 128, False, "bfloat16")
    assert MODEL_PRESETS["deepseek-r1-distill-llama-70b"] == MODEL_PRESETS["llama-70b"]
    assert MODEL_PRESETS["tiny"] == ModelConfig(2, 2, 64, False, "float16")
    copy = model_preset("tiny")
    copy.num_layers = 99
    assert MODEL_PRESETS["tiny"].num_layers == 2
    with pytest.raises(ConfigError, match="did you mean 'qwen-32b'"):
        model_preset("qwen-32")


def test_resolved_rules() -> None:
    tiny = model_preset("tiny")  # 16 KiB blocks of 16 tokens
    assert tiny.block_bytes(16) == 16 * 1024
    r = CacheConfig(cpu_cache_gb=0.5).resolved(tiny)
    assert r.num_cpu_blocks == GiB // 2 // (16 * 1024)
    assert CacheConfig(cpu_cache_gb=1e-9).resolved(tiny).num_cpu_blocks == 1  # at least one block
    r = CacheConfig(ssd_cache_gb=0, enable_ssd=False).resolved(tiny)
    assert r.enable_ssd is False
    with pytest.raises(ConfigError, match="model shape"):
        CacheConfig(cpu_cache_gb=1).resolved(None)
    plain = CacheConfig(num_cpu_blocks=3)
    assert plain.resolved(None) == plain and plain.resolved(None) is not plain
    with pytest.raises(ConfigError, match="drop"):
        CacheConfig(num_cpu_blocks=5, cpu_cache_gb=1).validate()


def test_errors_hierarchy() -> None:
    err = ConfigError("x", "cache_config.y")
    assert isinstance(err, FlexKVError) and isinstance(err, ValueError) and err.key == "cache_config.y"


def test_reexports() -> None:
    import flexkv.common.config as common_config
    import flexkv.config as top_config

    for mod in (common_config, top_config):
        assert mod.CacheConfig is CacheConfig and mod.ModelConfig is ModelConfig
        assert mod.FlexKVConfig is FlexKVConfig and mod.load_config is load_config


# ------------------------------------------------------------------------------------------------
# resources
# ------------------------------------------------------------------------------------------------

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


def test_cpu_tier_bounded_by_dev_shm() -> None:
    cache = CacheConfig(num_cpu_blocks=100)
    problems = check_resources(cache, model_preset("qwen-32b"), **fake_resources(shm=64 * MiB))
    assert len(problems) == 1 and "/dev/shm" in problems[0] and "--shm-size" in problems[0]
    assert "fits is 16" in problems[0]


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


# ------------------------------------------------------------------------------------------------
# describe and check-config
# ------------------------------------------------------------------------------------------------

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
    monkeypatch.setattr(resources_module, "read_shm_free", lambda: 1024 * GiB)
    monkeypatch.setattr(resources_module, "read_disk_free", lambda path: 1 << 50)


@pytest.fixture
def small_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources_module, "read_mem_available", lambda: 1 * GiB)
    monkeypatch.setattr(resources_module, "read_shm_free", lambda: 1 * GiB)
    monkeypatch.setattr(resources_module, "read_disk_free", lambda path: 1 * GiB)


def test_check_config_good_file(capsys: pytest.CaptureFixture[str], roomy_machine: None) -> None:
    rc = check_config.main([str(EXAMPLES / "single_node.json"), "--model", "qwen-32b"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    assert "single_node.json" in out
    assert "4 MiB (4194304 B" in out
    assert "195.31 GiB (50000 blocks x 4 MiB)" in out  # CPU tier
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
    readers = {"mem_available": lambda: 1 << 20, "shm_free": lambda: 1 << 20, "disk_free": lambda p: 1 << 40}
    assert resources_module.check_resources(plain, model, **readers) == []  # 1000 x 512 B fit in 1 MiB
    problems = resources_module.check_resources(with_ssd, model, **readers)  # 1000 x 4 KiB do not
    assert len(problems) == 1 and "num_cpu_blocks" in problems[0] and "largest num_cpu_blocks that fits is 256" \
        in problems[0]
