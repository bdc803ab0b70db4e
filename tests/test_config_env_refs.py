"""``${NAME}`` in config strings expands from the environment (core/env_refs.py), in the Python reader and the
C++ one alike; an unset variable is a ConfigError naming the key and the variable, never a literal path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexkv import _core
from flexkv.core import ConfigError
from flexkv.core.config_file import load_config
from flexkv.core.env_refs import expand_env_refs, expand_string

MANUAL_17_2 = {"server_recv_port": "ipc:///tmp/flexkv_${worker_id}_test",
               "cache_config": {"enable_ssd": True, "num_cpu_blocks": 100, "num_ssd_blocks": 100,
                                "ssd_cache_dir": ["/data/a_${worker_id}/", "/data/b_${worker_id}/"],
                                "remote_config_custom": {"bucket": "kv-${TENANT}", "n": 3}}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "flexkv.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_the_manual_per_worker_endpoint_and_directories_expand(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MANUAL_17_2), env={"worker_id": "1", "TENANT": "t9"})
    assert config.server_recv_port == "ipc:///tmp/flexkv_1_test"
    cc = config.cache_config
    assert cc.ssd_cache_dirs == ["/data/a_1/", "/data/b_1/"]
    assert cc.remote_config_custom == {"bucket": "kv-t9", "n": 3}
    other = load_config(write(tmp_path, MANUAL_17_2), env={"worker_id": "2", "TENANT": "t9"})
    assert other.server_recv_port == "ipc:///tmp/flexkv_2_test"  # one file, one endpoint per worker


def test_an_unset_variable_names_the_key_and_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, MANUAL_17_2)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"TENANT": "t"})
    assert err.value.key == "server_recv_port"
    text = str(err.value)
    assert str(path) in text and "${worker_id}" in text and "environment variable worker_id is not set" in text
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"worker_id": "0"})
    assert err.value.key == "cache_config.remote_config_custom.bucket" and "TENANT" in str(err.value)


@pytest.mark.parametrize("value", ["/d/${}", "/d/${worker id}", "/d/${worker_id", "/d/${1x}"])
def test_a_malformed_reference_is_an_error(value: str) -> None:
    with pytest.raises(ConfigError, match="not a \\$\\{NAME\\} reference") as err:
        expand_string(value, {"worker_id": "0"}, "cache_config.ssd_cache_dir")
    assert err.value.key == "cache_config.ssd_cache_dir"


def test_escapes_empty_values_and_what_is_left_alone() -> None:
    env = {"A": "x", "E": ""}
    assert expand_string("$${A} ${A}${E}$A $ {A}", env, "k") == "${A} x$A $ {A}"
    data = {"k${A}": "${A}", "n": 1, "b": True, "l": [None, "${A}"]}
    assert expand_env_refs(data, env) == {"k${A}": "x", "n": 1, "b": True, "l": [None, "x"]}  # keys stay


def test_flexkv_overrides_are_not_expanded(tmp_path: Path) -> None:
    path = write(tmp_path, {"cache_config": {"num_cpu_blocks": 10}})
    config = load_config(path, env={"FLEXKV_SERVER_RECV_PORT": "ipc:///tmp/x_${worker_id}"})
    assert config.server_recv_port == "ipc:///tmp/x_${worker_id}"


def test_the_cpp_reader_expands_and_refuses_the_same(tmp_path: Path) -> None:
    text = json.dumps(MANUAL_17_2)
    env = {"worker_id": "4", "TENANT": "t"}
    cpp = _core.read_config_text(text, "w.json", env, None)
    assert cpp["ssd_cache_dir"] == load_config(write(tmp_path, MANUAL_17_2), env=env).cache_config.ssd_cache_dirs
    assert cpp["remote_config_custom"] == {"bucket": "kv-t", "n": 3}
    for bad_env, value in (({"TENANT": "t"}, None), ({"worker_id": "0", "TENANT": "t"}, "/d/${x")):
        data = json.loads(text)
        if value is not None:
            data["cache_config"]["ssd_cache_dir"] = value
        with pytest.raises(ConfigError) as py_err:
            load_config(write(tmp_path, data), env=bad_env)
        with pytest.raises(ValueError) as cpp_err:
            _core.read_config_text(json.dumps(data), str(tmp_path / "flexkv.json"), bad_env, None)
        assert str(cpp_err.value) == str(py_err.value)
