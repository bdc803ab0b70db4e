"""flexkv.core.config's config model: the CacheConfig / ModelConfig dataclasses, dtypes and block bytes,
fingerprints, presets, resolved sizes, errors and re-exports."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flexkv.core.config import MODEL_PRESETS, CacheConfig, FlexKVConfig, ModelConfig, model_preset
from flexkv.core.config_file import load_config
from flexkv.core.errors import ConfigError, FlexKVError

from kv_helpers import QWEN_BLOCK_16, GiB

pytestmark = pytest.mark.usefixtures("no_flexkv_env")


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
    assert MODEL_PRESETS["qwen-32b"] == ModelConfig(64, 8, 128, 2, "bfloat16")
    assert MODEL_PRESETS["llama-70b"] == ModelConfig(80, 8, 128, 2, "bfloat16")
    assert MODEL_PRESETS["deepseek-r1-distill-llama-70b"] == MODEL_PRESETS["llama-70b"]
    assert MODEL_PRESETS["tiny"] == ModelConfig(2, 2, 64, 2, "float16")
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
