"""The original FlexKV's config files, environment variables and constructor arguments, read by FlexKV.

Its keys that map to keys here are read as those; its keys without effect here are accepted with ONE warning
and explained by ``flexkv check-config``; typos still fail with a did-you-mean; contradicting values fail.
The files below hold the same keys and values as the configs the original ships (its recommended config, its
vLLM and TensorRT-LLM examples, its benchmark configs in both formats).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from flexkv.core import check_config
from flexkv.core.config import CacheConfig, ModelConfig
from flexkv.core.config_file import load_config
from flexkv.core.errors import ConfigError, LayoutError
from flexkv.core.layout import KVCacheLayout, KVCacheLayoutType

RECOMMENDED = {"cpu_cache_gb": 32, "ssd_cache_gb": 1024, "ssd_cache_dir": "/data/flexkv_ssd/", "enable_gds": False}
VLLM_EXAMPLE = {"cpu_cache_gb": 32, "ssd_cache_gb": 64, "ssd_cache_dir": "./ssd_cache/", "enable_gds": False}
BENCH_FLAT = {"num_layers": 64, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16", "kv_dim": 2, "tp_size": 1,
              "dp_size": 1, "tokens_per_block": 16, "cpu_cache_gb": 8, "ssd_cache_gb": 16,
              "ssd_cache_dir": "./ssd_cache1/;./ssd_cache2/", "enable_gds": False}
BENCH_SECTIONS = {
    "ModelConfig": {"num_layers": 64, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16", "kv_dim": 2,
                    "tp_size": 1, "dp_size": 1},
    "CacheConfig": {"enable_cpu": True, "enable_ssd": True, "enable_remote": False, "tokens_per_block": 16,
                    "use_gds": False, "gpu_kv_layout_type": "LAYERWISE", "cpu_kv_layout_type": "BLOCKWISE",
                    "num_cpu_blocks": 2048, "num_ssd_blocks": 4096, "num_remote_blocks": None,
                    "use_ce_transfer_h2d": False, "transfer_num_cta_h2d": 4, "transfer_num_cta_d2h": 4,
                    "max_blocks_per_file": 32000, "ssd_cache_dir": "./ssd_cache1/", "ssd_cache_iouring_entries": 32,
                    "remote_cache_size_mode": "file_size", "remote_file_size": None, "enable_trace": False,
                    "trace_file_path": "./flexkv_trace.log", "evict_ratio": 0.05, "index_accel": True}}
BENCH_DIST = {"num_layers": 4, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16", "kv_dim": 2, "tp_size": 1,
              "dp_size": 1, "tokens_per_block": 16, "cpu_cache_gb": 4, "ssd_cache_gb": 0, "enable_p2p_cpu": True,
              "redis_host": "10.0.0.1", "redis_port": 6379, "redis_password": "x", "local_ip": "10.0.0.2",
              "mooncake_engine_ip": "10.0.0.2", "mooncake_engine_port": 5555, "mooncake_protocol": "rdma",
              "server_client_mode": False}


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def _warnings(log: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in log if r.levelno == logging.WARNING and "original FlexKV" in r.getMessage()]


@pytest.mark.parametrize(("name", "data"), [("recommended.yml", RECOMMENDED), ("recommended.json", RECOMMENDED),
                                            ("vllm.yml", VLLM_EXAMPLE), ("trtllm.json", dict(RECOMMENDED)),
                                            ("bench.yml", BENCH_FLAT), ("bench.json", BENCH_SECTIONS),
                                            ("dist.yml", BENCH_DIST)])
def test_the_original_shipped_configs_load(tmp_path: Path, name: str, data: dict[str, Any],
                                           flexkv_log: list[logging.LogRecord], upstream_warnings: None) -> None:
    config = load_config(_write(tmp_path, name, data), env={})
    cache, model = config.cache_config, config.model_config
    if "cpu_cache_gb" in data:
        assert cache.cpu_cache_gb == data["cpu_cache_gb"]
    if "num_layers" in data or "ModelConfig" in data:
        assert model is not None and (model.num_layers, model.num_kv_heads, model.head_size) == (
            data.get("num_layers", 64), 8, 128) and model.use_mla is False and model.dtype == "bfloat16"
    if name == "bench.json":
        assert (cache.num_cpu_blocks, cache.num_ssd_blocks, cache.transfer_sms_h2d, cache.evict_ratio) == (
            2048, 4096, 4, 0.05)
        assert cache.ssd_cache_iouring_entries == 32
    if name == "bench.yml":
        assert cache.ssd_cache_dirs == ["./ssd_cache1/", "./ssd_cache2/"] and cache.tokens_per_block == 16
    said = _warnings(flexkv_log)
    assert len(said) == 1 and "no effect" in said[0] and "flexkv check-config" in said[0]
    ignored = {"enable_gds", "use_gds", "enable_p2p_cpu", "redis_host", "index_accel", "enable_trace"}
    for key in ignored & (set(data) | set(data.get("CacheConfig", {}))):
        assert key in said[0]
    load_config(_write(tmp_path, name, data), env={})
    assert len(_warnings(flexkv_log)) == 1  # each key is named once per process


def test_check_config_explains_each_original_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 no_flexkv_env: None) -> None:
    path = _write(tmp_path, "bench.json", BENCH_SECTIONS)
    assert check_config.main([str(path), "--skip-resources"]) == 0
    out = capsys.readouterr().out
    assert "keys of the original FlexKV" in out
    assert "use_gds: no effect here (GPU Direct Storage" in out
    assert "transfer_num_cta_h2d: the original FlexKV's name of cache_config.transfer_sms_h2d" in out
    for key in ("gpu_kv_layout_type", "max_blocks_per_file", "remote_cache_size_mode", "index_accel",
                "enable_trace", "trace_file_path", "kv_dim"):
        assert f"  {key}: " in out, key


def test_typos_still_fail_and_contradictions_fail(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean cpu_cache_gb"):
        load_config(_write(tmp_path, "a.json", {"cpu_cache_gbs": 32}), env={})
    with pytest.raises(ConfigError, match="unknown key 'enable_gdss'"):
        load_config(_write(tmp_path, "b.json", {"enable_gdss": False}), env={})
    with pytest.raises(ConfigError, match="kv_dim"):
        load_config(_write(tmp_path, "c.json", {"kv_dim": 3, "num_layers": 2}), env={})
    with pytest.raises(ConfigError, match="both set model_config.use_mla"):
        load_config(_write(tmp_path, "d.json", {"kv_dim": 1, "use_mla": False}), env={})
    with pytest.raises(ConfigError, match="both given"):
        load_config(_write(tmp_path, "e.json", {"transfer_num_cta_h2d": 4,
                                                 "cache_config": {"transfer_sms_h2d": 8}}), env={})
    with pytest.raises(ConfigError, match="both given"):
        load_config(_write(tmp_path, "f.json", {"CacheConfig": {}, "cache_config": {}}), env={})
    with pytest.raises(ConfigError, match="transfer_num_cta_h2d must be an integer"):
        load_config(_write(tmp_path, "g.json", {"transfer_num_cta_h2d": "4"}), env={})
    with pytest.raises(ConfigError, match="belongs in model_config"):  # a model key inside cache_config
        load_config(_write(tmp_path, "h.json", {"cache_config": {"kv_dim": 2}}), env={})
    c = load_config(_write(tmp_path, "i.json", {"kv_dim": 1, "num_layers": 2, "num_kv_heads": 1}), env={})
    assert c.model_config is not None and c.model_config.use_mla is True and c.model_config.kv_dim == 1


def test_the_original_environment_variables(flexkv_log: list[logging.LogRecord], upstream_warnings: None) -> None:
    env = {"FLEXKV_TRANSFER_NUM_CTA_H2D": "6", "FLEXKV_IOURING_ENTRIES": "64", "FLEXKV_ENABLE_GDS": "1",
           "FLEXKV_CPU_LAYOUT": "LAYERFIRST", "FLEXKV_INDEX_ACCEL": "0", "FLEXKV_CPU_CACHE_GB": "4"}
    c = load_config(env=env).cache_config
    assert (c.transfer_sms_h2d, c.ssd_cache_iouring_entries, c.cpu_cache_gb) == (6, 64, 4.0)
    said = _warnings(flexkv_log)
    assert len(said) == 1 and all(k in said[0] for k in ("enable_gds", "cpu_layout_type", "index_accel"))
    assert not [r for r in flexkv_log if "not a FlexKV config key" in r.getMessage()]
    with pytest.raises(ConfigError, match="FLEXKV_TRANSFER_NUM_CTA_D2H"):
        load_config(env={"FLEXKV_TRANSFER_NUM_CTA_D2H": "many"})


def test_model_config_takes_the_original_arguments() -> None:
    m = ModelConfig(4, 8, 128, 2, torch.float16, 1, 1, 1)  # num_layers .. kv_dim, dtype, tp, pp, dp
    assert (m.num_layers, m.use_mla, m.dtype_name, m.tp_size, m.dp_size, m.pp_size) == (4, False, "float16", 1, 1, 1)
    mla = ModelConfig(num_layers=4, num_kv_heads=1, head_size=576, kv_dim=1, dtype=torch.bfloat16)
    assert mla.use_mla and mla.kv_dim == 1 and mla.bytes_per_token_per_layer == 576 * 2
    m.kv_dim = 1  # the original's tests set it after construction
    assert m.use_mla
    assert ModelConfig(num_layers=2, use_mla=False, kv_dim=2).kv_dim == 2
    with pytest.raises(TypeError, match="argument 4 is kv_dim"):
        ModelConfig(4, 8, 128, True)  # this project's former order (use_mla fourth) fails, naming kv_dim
    with pytest.raises(TypeError, match="argument 2 is num_kv_heads"):
        ModelConfig(4, "8")
    with pytest.raises(ConfigError, match="disagree"):
        ModelConfig(num_layers=2, kv_dim=1, use_mla=False)
    with pytest.raises(ConfigError, match="pp_size"):
        ModelConfig(2, 2, 64, 2, "float16", 1, 2)
    with pytest.raises(TypeError, match="unexpected argument"):
        ModelConfig(num_layer=2)


def test_cache_config_takes_the_original_arguments(flexkv_log: list[logging.LogRecord],
                                                   upstream_warnings: None) -> None:
    c = CacheConfig(16, "lru", True, False, enable_gds=False, num_cpu_blocks=100, remote_file_num=16,
                    transfer_num_cta_h2d=4)
    assert (c.tokens_per_block, c.enable_cpu, c.num_cpu_blocks, c.transfer_sms_h2d) == (16, True, 100, 4)
    assert c.enable_gds is False and c.remote_file_num == 16 and CacheConfig().enable_p2p_cpu is False
    said = _warnings(flexkv_log)
    assert len(said) == 1 and "remote_file_num" in said[0] and "enable_gds" not in said[0]  # defaults: silent
    with pytest.raises(TypeError, match="argument 2 is eviction_policy"):
        CacheConfig(16, True)
    with pytest.raises(TypeError, match="did you mean num_cpu_blocks"):
        CacheConfig(num_cpu_block=10)


def test_kv_cache_layout_seventh_argument_is_kv_dim() -> None:
    lay = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 2, 8, 2)
    assert lay.kv_dim == 2 and not lay.is_mla and lay.kv_shape == (2, 2, 64, 16, 2, 8)
    mla = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 1, 576, 1, 1)
    assert mla.is_mla and mla.num_kv_heads == 1
    assert KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 1, 576, is_mla=True) == mla
    with pytest.raises(LayoutError, match="kv_dim"):
        KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 2, 8, True)
    with pytest.raises(LayoutError, match="kv_dim"):
        KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 2, 8, 3)
    with pytest.raises(LayoutError, match="num_head"):
        KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, "2", 8)
    with pytest.raises(LayoutError, match="disagree"):
        KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 2, 64, 16, 2, 8, 2, is_mla=True)
    half = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, 4, 64, 16, 8, 128, 2, 8).div_head(2)
    assert (half.num_head, half.num_kv_heads, half.kv_dim) == (4, 8, 2)
    assert half.div_layer(2).num_layer == 2


def test_the_original_module_paths() -> None:
    from flexkv.common.config import GLOBAL_CONFIG_FROM_ENV
    from flexkv.common.debug import flexkv_logger
    from flexkv.integration.sglang import FlexKVConfig, KVTPClient
    from flexkv.integration.vllm.vllm_v1_adapter import (
        FlexKVConnectorV1Impl,
        FlexKVSchedulerConnector,
        FlexKVWorkerConnector,
    )

    assert flexkv_logger.name == "flexkv"
    assert GLOBAL_CONFIG_FROM_ENV.server_recv_port.startswith(("ipc://", "tcp://"))
    assert GLOBAL_CONFIG_FROM_ENV.enable_gds is False
    assert callable(FlexKVSchedulerConnector.reset_cache) and callable(FlexKVConnectorV1Impl.reset_cache)
    assert callable(FlexKVWorkerConnector.before_device_sleep) and callable(FlexKVWorkerConnector.after_device_wake)
    assert KVTPClient("ipc:///tmp/x", 0, 3, intra_client_id=1)._rank == 1
    assert KVTPClient("ipc:///tmp/x", 0, 3).device_id == 3  # the original's order: device_id third
    assert FlexKVConfig.__name__ == "FlexKVConfig"
