"""flexkv.core.config_file's loader: parsing (comments, errors that name the file), unknown keys, wrong
types and out-of-range values, each refused naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexkv.core.config import CacheConfig
from flexkv.core.config_file import load_config, strip_json_comments
from flexkv.core.errors import ConfigError

from kv_helpers import write, write_json

pytestmark = pytest.mark.usefixtures("no_flexkv_env")


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
