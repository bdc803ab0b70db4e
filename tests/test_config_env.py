"""Environment overrides of the config (FLEXKV_* variables, FLEXKV_CONFIG_PATH) in
flexkv.core.config_file.load_config."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flexkv.core import config_file
from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig, model_preset
from flexkv.core.config_file import DEFAULT_CPU_CACHE_GB, load_config
from flexkv.core.errors import ConfigError

from kv_helpers import EXAMPLES, QWEN_BLOCK_16, GiB, write_json

pytestmark = pytest.mark.usefixtures("no_flexkv_env")


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
    assert load_config(env=env) == FlexKVConfig(cache_config=CacheConfig(cpu_cache_gb=DEFAULT_CPU_CACHE_GB))
    assert not [r for r in flexkv_log if r.levelno >= logging.WARNING and "no config file" not in r.getMessage()]
    c = load_config(env={"FLEXKV_NUM_CPU_BLOCK": "5"})
    assert c.cache_config.num_cpu_blocks == 1000000  # not applied, not fatal
    warnings = [r.getMessage() for r in flexkv_log if r.levelno == logging.WARNING
                and "no config file" not in r.getMessage()]
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


def test_defaults_without_file_or_env(flexkv_log: list[logging.LogRecord], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_file, "_logged_no_config", False)
    c = load_config(env={})
    # no config at all: the original FlexKV's 16 GiB CPU tier, and the start says no config file was found
    assert c == FlexKVConfig(cache_config=CacheConfig(cpu_cache_gb=16.0))
    assert c.server_recv_port == "ipc:///tmp/flexkv_server" and c.model_config is None
    said = [r.getMessage() for r in flexkv_log if "no config file found" in r.getMessage()]
    assert len(said) == 1 and "FLEXKV_CONFIG_PATH" in said[0] and "16 GiB" in said[0]
    load_config(env={})
    assert len([r for r in flexkv_log if "no config file found" in r.getMessage()]) == 1  # said once
    # an empty file, or a CPU size from the environment, is a config: no fallback
    assert load_config(env={"FLEXKV_NUM_CPU_BLOCKS": "7"}).cache_config.cpu_cache_gb is None
    assert load_config(env={"FLEXKV_CPU_CACHE_GB": "2"}).cache_config.cpu_cache_gb == 2.0
    assert load_config(env={}).cache_config.resolved(ModelConfig(num_layers=2, num_kv_heads=2, head_size=64,
                                                                 dtype="float16")).num_cpu_blocks == 16 * 2**30 // (
        2 * 2 * 2 * 64 * 2 * 16)
