"""Bad config and KVManager arguments: a ConfigError / TypeError / TaskError naming the key before anything is
allocated, and a running manager undisturbed.

A running manager starts with a reference sequence stored (conftest's make_env) and must still load it
byte-exact afterwards, its CPU index consistent and holding no lock.
"""

from __future__ import annotations

import pytest

from flexkv import KVManager
from flexkv.core.errors import ConfigError, FlexKVError, TaskError

from kv_helpers import DEFAULT_CACHE, DEFAULT_MODEL, configs
from kv_helpers import RefKVEnv as Env

L = DEFAULT_MODEL["num_layers"]
T = DEFAULT_CACHE["tokens_per_block"]


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def test_enable_ssd_without_a_directory_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        KVManager(*configs(enable_ssd=True))
    assert "ssd_cache_dir" in str(exc.value)


def test_enable_remote_without_a_path_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as exc:
        KVManager(*configs(enable_remote=True, num_remote_blocks=1000))
    assert exc.value.key == "cache_config.remote_cache_path"
    assert "enable_remote" in str(exc.value)


def test_enable_remote_without_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as exc:
        KVManager(*configs(enable_remote=True))
    assert exc.value.key == "cache_config.num_remote_blocks"
    assert "num_remote_blocks" in str(exc.value)


def test_wrong_config_types_are_refused() -> None:
    with pytest.raises(TypeError, match="model_config"):
        KVManager({"num_layers": L}, configs()[1])
    with pytest.raises(TypeError, match="cache_config"):
        KVManager(configs()[0], {"tokens_per_block": T})


def test_refused_configs_do_not_disturb_a_running_manager(env: Env) -> None:
    for kwargs in ({"enable_ssd": True, "ssd_cache_dir": "/dev/null/no-such-dir"},
                   {"enable_remote": True, "num_remote_blocks": 10}):
        with pytest.raises(FlexKVError):
            KVManager(*configs(**kwargs)).start()
    env.assert_healthy()


def test_manager_arguments_are_checked_before_anything_is_allocated() -> None:
    with pytest.raises(TaskError, match="num_copy_threads"):
        KVManager(*configs(num_cpu_blocks=8), num_copy_threads=0)
    with pytest.raises(ConfigError, match="num_cpu_blocks"):
        KVManager(*configs(num_cpu_blocks=2**31))
