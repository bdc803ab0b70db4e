"""The Python and the C++ config readers agree: one file and one environment mean the same keys in both.

The C++ reader (``flexkv::CacheOptions``) is reached through ``flexkv._core.read_config_text`` / ``read_config_file``,
which return the typed C++ options as a dict keyed by config key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from flexkv import _core
from flexkv.core import config_file
from flexkv.core.config import MODEL_PRESETS, CacheConfig, ModelConfig
from flexkv.core.config_file import load_config
from flexkv.core.config_keys import KEYS_FILE, section_keys
from flexkv.core.errors import ConfigError

from kv_helpers import MANUAL_BLOCKS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"
EXAMPLE_FILES = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".json", ".yaml", ".yml"))

SHAPES = [
    ModelConfig(num_layers=64, num_kv_heads=8, head_size=128, dtype="bfloat16"),
    ModelConfig(num_layers=2, num_kv_heads=2, head_size=64, dtype="fp16"),
    ModelConfig(num_layers=61, num_kv_heads=1, head_size=576, use_mla=True, dtype="fp8"),
    ModelConfig(num_layers=80, num_kv_heads=16, head_size=128, dtype="float32", tp_size=4, dp_size=2),
    ModelConfig(num_layers=3, num_kv_heads=5, head_size=96, dtype="fp8_e5m2", tp_size=1),
    ModelConfig(num_layers=1, num_kv_heads=1, head_size=1, dtype="uint8"),
]


@pytest.fixture(autouse=True)
def _no_flexkv_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FLEXKV_"):
            monkeypatch.delenv(name)


def json_text(path: Path) -> str:
    """The file as the C++ reader takes it: JSON as written, YAML (Python-only) converted to JSON."""
    text = path.read_text(encoding="utf-8")
    return json.dumps(yaml.safe_load(text)) if path.suffix in (".yaml", ".yml") else text


def model_dict(model: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(model)


def assert_same_cache(python: CacheConfig, cpp: dict[str, Any]) -> None:
    """Every cache_config key the C++ options hold equals the Python value."""
    cpp_keys = set(cpp) - {"num_copy_threads", "model", "warnings"}
    assert cpp_keys <= set(section_keys("cache_config")), "a C++ field that is not a config key"
    assert len(cpp_keys) >= 20
    for key in sorted(cpp_keys):
        want = python.ssd_cache_dirs or None if key == "ssd_cache_dir" else getattr(python, key)
        got = cpp[key]
        assert got == want and isinstance(got, bool) == isinstance(want, bool), f"{key}: Python {want!r}, C++ {got!r}"


def both(text: str, where: str, tmp_path: Path, env: dict[str, str] | None = None,
         model: ModelConfig | None = None) -> tuple[CacheConfig, dict[str, Any]]:
    path = tmp_path / Path(where).name
    path.write_text(text, encoding="utf-8")
    env = {"worker_id": "0", **(env or {})}  # the manual's ${worker_id}, for both readers
    config = load_config(path, env=env)
    cache = config.cache_config if model is None else config.cache_config.resolved(model)
    cpp = _core.read_config_text(text, where, env, None if model is None else model_dict(model))
    if config.model_config is None:
        assert cpp["model"] is None
    else:
        m = cpp["model"]
        assert m["fingerprint"] == config.model_config.fingerprint()
        for key in ("num_layers", "num_kv_heads", "head_size", "use_mla", "tp_size"):
            assert m[key] == getattr(config.model_config, key), key
        assert m["dtype"] == config.model_config.dtype_name
    return cache, cpp


# ------------------------------------------------------------------------------------------------
# the same files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_files_read_the_same(name: str, tmp_path: Path) -> None:
    text = json_text(EXAMPLES / name)
    cache, cpp = both(text, name + ".json", tmp_path)
    assert_same_cache(cache, cpp)
    for model in SHAPES[:3]:  # and resolved to blocks for several shapes
        cache, cpp = both(text, name + ".json", tmp_path, model=model)
        assert_same_cache(cache, cpp)


@pytest.mark.parametrize("name", sorted(MANUAL_BLOCKS))
def test_manual_blocks_read_the_same(name: str, tmp_path: Path) -> None:
    cache, cpp = both(MANUAL_BLOCKS[name], name, tmp_path)
    assert_same_cache(cache, cpp)
    assert cpp["num_cpu_blocks"] in (50000, 200000, 500000)


def test_defaults_are_the_same(tmp_path: Path) -> None:
    cache, cpp = both("{}", "empty.json", tmp_path)
    assert cache == CacheConfig()
    assert_same_cache(cache, cpp)


def test_odd_sizes_resolve_to_the_same_block_counts(tmp_path: Path) -> None:
    for gb in (1e-9, 0.001, 0.1, 0.3, 1.5, 7.77, 32, 1000.25):
        for model in SHAPES:
            for tpb in (1, 16, 48, 64):
                text = json.dumps({"cpu_cache_gb": gb, "ssd_cache_gb": gb / 3, "ssd_cache_dir": "/d",
                                   "cache_config": {"tokens_per_block": tpb}})
                cache, cpp = both(text, "sizes.json", tmp_path, model=model)
                assert (cpp["num_cpu_blocks"], cpp["num_ssd_blocks"]) == (cache.num_cpu_blocks, cache.num_ssd_blocks)
    cache, cpp = both('{"ssd_cache_gb": 0}', "off.json", tmp_path, model=SHAPES[0])
    assert cpp["enable_ssd"] is False and cache.enable_ssd is False


def test_fingerprints_match_for_several_shapes() -> None:
    prints = set()
    for model in SHAPES:
        cpp = _core.read_config_text(json.dumps({"model_config": model_dict(model)}))["model"]
        assert cpp["fingerprint"] == model.fingerprint()
        prints.add(cpp["fingerprint"])
    assert len(prints) == len(SHAPES)
    assert _core.read_config_text(json.dumps({"model_config": model_dict(MODEL_PRESETS["qwen-32b"])}))["model"][
        "fingerprint"] == "dtype=bfloat16;kv_heads=8;head_size=128;layers=64;mla=0;tp=1"


def test_the_library_embeds_the_shipped_key_table() -> None:
    assert _core.config_keys_json() == KEYS_FILE.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# the same environment
# ------------------------------------------------------------------------------------------------

ENVS = [
    {"FLEXKV_NUM_CPU_BLOCKS": "1000", "FLEXKV_ENABLE_SSD": "No", "FLEXKV_USE_CE_TRANSFER_D2H": "0",
     "FLEXKV_ENABLE_REMOTE": "ON", "FLEXKV_NUM_REMOTE_BLOCKS": "77", "FLEXKV_EVICT_RATIO": "0.1",
     "FLEXKV_SSD_CACHE_DIR": "/a;/b", "FLEXKV_REMOTE_CONFIG_CUSTOM": '{"k": 1}',
     "FLEXKV_SERVER_RECV_PORT": "tcp://127.0.0.1:6000", "FLEXKV_EVICTION_POLICY": "lru"},
    {"FLEXKV_USE_HUGEPAGE_CPU_BUFFER": "yes", "FLEXKV_TRANSFER_SMS_D2H": " 12 ", "FLEXKV_TOKENS_PER_BLOCK": "1_024"},
    {"FLEXKV_CPU_CACHE_GB": "4", "FLEXKV_NUM_REMOTE_BLOCKS": "none", "FLEXKV_REMOTE_CACHE_PATH": "s3://b/"},
    {"FLEXKV_NUM_CPU_BLOCKS": "100", "FLEXKV_SSD_CACHE_GB": "1e1", "FLEXKV_SSD_CACHE_DIR": " /n0 ; /n1 "},
    {"FLEXKV_CONFIG_PATH": "", "FLEXKV_LOG_LEVEL": "DEBUG", "FLEXKV_TEST_ANYTHING": "x", "FLEXKV_MASTER_HOST": "h",
     "OTHER": "1", "FLEXKV_SSD_CACHE_IOURING_FLAGS": "+3"},
]


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("name", ["single_node.json", "short_form.json", "cpu_only.json"])
def test_environment_overrides_are_the_same(name: str, env: dict[str, str], tmp_path: Path) -> None:
    cache, cpp = both(json_text(EXAMPLES / name), name, tmp_path, env=env)
    assert_same_cache(cache, cpp)
    assert cpp["warnings"] == []


def test_unknown_variables_warn_in_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_file, "_logged_no_config", True)  # only the variables' warnings here
    env = {"FLEXKV_NUM_CPU_BLOCK": "5", "FLEXKV_SERVER_PORT": "x"}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("flexkv")
    log.addHandler(handler)
    try:
        load_config(env=env)
    finally:
        log.removeHandler(handler)
    python = sorted(r.getMessage() for r in records)
    cpp = sorted(_core.read_config_text("{}", "defaults", env)["warnings"])
    assert len(python) == len(cpp) == 2
    for p, c in zip(python, cpp):
        assert p == c, (p, c)


def test_read_config_file_follows_flexkv_config_path(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"cache_config": {"num_cpu_blocks": 4242}}', encoding="utf-8")
    env = {"FLEXKV_CONFIG_PATH": str(path)}
    assert _core.read_config_file("", env)["num_cpu_blocks"] == 4242 == load_config(env=env).cache_config.num_cpu_blocks
    env["FLEXKV_NUM_CPU_BLOCKS"] = "17"
    assert _core.read_config_file("", env)["num_cpu_blocks"] == 17 == load_config(env=env).cache_config.num_cpu_blocks
    assert _core.read_config_file("", {})["num_cpu_blocks"] == 1000000  # no file: the defaults, as in Python
    with pytest.raises(ValueError, match="does not exist"):
        _core.read_config_file(str(tmp_path / "gone.json"), {})
    with pytest.raises(ValueError, match="only the Python API reads"):
        _core.read_config_file(str(EXAMPLES / "short_form.yaml"), {})


# ------------------------------------------------------------------------------------------------
# the same mistakes
# ------------------------------------------------------------------------------------------------

BAD = [
    {"cache_config": {"num_cpu_block": 10}},
    {"num_cpu_block": 10},
    {"num_cpu_blocks": 10},
    {"server_recv_prot": "ipc:///x"},
    {"server_recv_port": "/tmp/flexkv"},
    {"server_recv_port": 5555},
    {"num_log_interval_requests": -1},
    {"model_config": {"num_layer": 2}},
    {"cache_config": {"server_recv_port": "ipc:///x"}},
    {"cache_config": {"num_layers": 2}},
    {"cache_config": 5},
    {"model_config": [1]},
    {"cache_config": {"tokens_per_block": "16"}},
    {"cache_config": {"num_cpu_blocks": True}},
    {"cache_config": {"num_cpu_blocks": 1e5}},
    {"cache_config": {"enable_ssd": 1}},
    {"cache_config": {"evict_ratio": "0.1"}},
    {"cache_config": {"ssd_cache_dir": ["/a", 3]}},
    {"cache_config": {"ssd_cache_dir": []}},
    {"cache_config": {"ssd_cache_dir": ""}},
    {"cache_config": {"ssd_cache_dir": ";"}},
    {"cache_config": {"remote_config_custom": "x"}},
    {"cpu_cache_gb": "32"},
    {"model_config": {"num_layers": "64", "num_kv_heads": 1, "head_size": 1}},
    {"model_config": {"use_mla": 0, "num_layers": 1, "num_kv_heads": 1, "head_size": 1}},
    {"model_config": {"dtype": 2, "num_layers": 1, "num_kv_heads": 1, "head_size": 1}},
    {"model_config": {"dtype": "float64", "num_layers": 1, "num_kv_heads": 1, "head_size": 1}},
    {"model_config": {"num_layers": 0, "num_kv_heads": 1, "head_size": 1}},
    {"model_config": {"tp_size": 0, "num_layers": 1, "num_kv_heads": 1, "head_size": 1}},
    {"cache_config": {"evict_ratio": 1.5}},
    {"cache_config": {"evict_ratio": -0.1}},
    {"cache_config": {"tokens_per_block": 0}},
    {"cache_config": {"num_cpu_blocks": 0}},
    {"cache_config": {"enable_ssd": True, "num_ssd_blocks": 0, "ssd_cache_dir": "/x"}},
    {"cache_config": {"transfer_sms_h2d": 0}},
    {"cache_config": {"transfer_sms_d2h": 257}},
    {"cache_config": {"ssd_cache_iouring_entries": 0}},
    {"cache_config": {"ssd_cache_iouring_flags": -1}},
    {"cache_config": {"eviction_policy": "fifo"}},
    {"cache_config": {"cpu_cache_gb": 0}},
    {"cache_config": {"ssd_cache_gb": -1}},
    {"cache_config": {"enable_cpu": False}},
    {"cache_config": {"enable_remote": True}},
    {"cache_config": {"enable_ssd": True}},
    {"cache_config": {"ssd_cache_gb": 0, "enable_ssd": True, "ssd_cache_dir": "/x"}},
    {"cpu_cache_gb": 32, "cache_config": {"num_cpu_blocks": 5000}},
    {"cache_config": {"num_cpu_blocks": 5000, "cpu_cache_gb": 32}},
    {"ssd_cache_gb": 10, "cache_config": {"num_ssd_blocks": 5}},
    {"ssd_cache_dir": "/a", "cache_config": {"ssd_cache_dir": "/b"}},
    {"cpu_cache_gb": -1},
    # the original FlexKV's keys: contradictions and wrong values
    {"kv_dim": 3, "num_layers": 2},
    {"kv_dim": 1, "use_mla": False},
    {"transfer_num_cta_h2d": 4, "cache_config": {"transfer_sms_h2d": 8}},
    {"CacheConfig": {}, "cache_config": {}},
    {"transfer_num_cta_h2d": "4"},
    {"cache_config": {"kv_dim": 2}},
    {"enable_gdss": False},
]


@pytest.mark.parametrize("data", BAD, ids=[json.dumps(d)[:60] for d in BAD])
def test_both_readers_refuse_the_same_files_naming_the_same_key(data: dict, tmp_path: Path) -> None:
    text = json.dumps(data)
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as python:
        load_config(path, env={})
    with pytest.raises(ValueError) as cpp:
        _core.read_config_text(text, "bad.json")
    assert python.value.key is not None
    assert str(cpp.value).startswith(f"bad.json: {python.value.key}: "), (str(python.value), str(cpp.value))


@pytest.mark.parametrize(("var", "value"), [
    ("FLEXKV_NUM_CPU_BLOCKS", "lots"), ("FLEXKV_NUM_CPU_BLOCKS", "1.5"), ("FLEXKV_ENABLE_SSD", "maybe"),
    ("FLEXKV_EVICT_RATIO", "abc"), ("FLEXKV_EVICT_RATIO", "nan"), ("FLEXKV_EVICT_RATIO", "2"),
    ("FLEXKV_REMOTE_CONFIG_CUSTOM", "{bad"), ("FLEXKV_REMOTE_CONFIG_CUSTOM", "[1]"),
])
def test_both_readers_refuse_the_same_environment(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as python:
        load_config(env={var: value})
    with pytest.raises(ValueError) as cpp:
        _core.read_config_text("{}", "defaults", {var: value})
    assert var in str(python.value) and var in str(cpp.value)
    assert python.value.key in str(cpp.value)


def test_duplicates_and_syntax_errors_in_both(tmp_path: Path) -> None:
    for text, python_says, cpp_says in [
        ('{"cache_config": {"num_cpu_blocks": 10, "num_cpu_blocks": 20}}', "twice",
         "cache_config.num_cpu_blocks: given twice"),
        ('{\n  "cache_config": {\n    "num_cpu_blocks": 10 // c\n    "x": 1\n  }\n}\n', "line 4, column 5",
         "c.json:4:5:"),
        ('{"cache_config": {"num_cpu_blocks": 10,  // last\n}}', "trailing comma", "trailing comma"),
    ]:
        path = tmp_path / "c.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=python_says):
            load_config(path, env={})
        with pytest.raises(ValueError, match=cpp_says):
            _core.read_config_text(text, "c.json")


# ------------------------------------------------------------------------------------------------
# the original FlexKV's configs
# ------------------------------------------------------------------------------------------------

ORIGINAL = {  # its formats, as JSON (the C++ reader reads no YAML): its recommended config, its benchmarks' two
    "recommended.json": {"cpu_cache_gb": 32, "ssd_cache_gb": 1024, "ssd_cache_dir": "/data/flexkv_ssd/",
                         "enable_gds": False},
    "bench_flat.json": {"num_layers": 64, "num_kv_heads": 8, "head_size": 128, "dtype": "bfloat16", "kv_dim": 2,
                        "tp_size": 1, "dp_size": 1, "tokens_per_block": 16, "cpu_cache_gb": 8, "ssd_cache_gb": 16,
                        "ssd_cache_dir": "./a/;./b/", "enable_gds": False, "evict_ratio": 0.05},
    "bench_sections.json": {
        "ModelConfig": {"num_layers": 61, "num_kv_heads": 1, "head_size": 576, "dtype": "bfloat16", "kv_dim": 1},
        "CacheConfig": {"enable_ssd": True, "tokens_per_block": 64, "use_gds": False, "num_cpu_blocks": 2048,
                        "num_ssd_blocks": 4096, "transfer_num_cta_h2d": 4, "ssd_cache_dir": "./ssd/",
                        "max_blocks_per_file": 32000, "index_accel": True, "evict_ratio": 0.05}},
}


@pytest.mark.parametrize("name", ORIGINAL)
def test_the_original_configs_read_the_same(name: str, tmp_path: Path) -> None:
    cache, cpp = both(json.dumps(ORIGINAL[name]), name, tmp_path)
    assert_same_cache(cache, cpp)
    (warning,) = cpp["warnings"]
    assert "have no effect here" in warning and ("enable_gds" in warning or "use_gds" in warning)


def test_the_original_environment_reads_the_same(tmp_path: Path) -> None:
    env = {"FLEXKV_TRANSFER_NUM_CTA_H2D": "6", "FLEXKV_IOURING_ENTRIES": "64", "FLEXKV_ENABLE_GDS": "1",
           "FLEXKV_CPU_LAYOUT": "LAYERFIRST"}
    cache, cpp = both("{}", "empty.json", tmp_path, env=env)
    assert_same_cache(cache, cpp)
    assert (cpp["transfer_sms_h2d"], cpp["ssd_cache_iouring_entries"]) == (6, 64)
    (warning,) = cpp["warnings"]
    assert "enable_gds" in warning and "cpu_layout_type" in warning


def test_no_config_at_all_is_a_16_gib_cpu_tier_in_both() -> None:
    cpp = _core.read_config_file("", {})
    assert cpp["cpu_cache_gb"] == 16.0 == load_config(env={}).cache_config.cpu_cache_gb
    assert any("no config file found" in w for w in cpp["warnings"])
    assert _core.read_config_file("", {"FLEXKV_NUM_CPU_BLOCKS": "9"})["cpu_cache_gb"] is None

