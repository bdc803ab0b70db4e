"""The example config files (examples/configs) and the manual's JSON blocks: each loads, validates and
holds the values it shows (flexkv.core.config_file over real files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flexkv.core.config import MODEL_PRESETS, FlexKVConfig, model_preset
from flexkv.core.config_file import load_config

from kv_helpers import (
    EXAMPLES,
    MANUAL_BLOCKS,
    MANUAL_DISTRIBUTED_WORKER,
    MANUAL_LARGE_SCALE,
    MANUAL_SINGLE_NODE,
    QWEN_BLOCK_16,
    GiB,
    MiB,
    write,
    write_json,
)

pytestmark = pytest.mark.usefixtures("no_flexkv_env")

ROOT = Path(__file__).resolve().parents[1]
# The manual sits in the workspace's shared/ folder, beside the checkout or beside the worktrees' folder.
SEED = next((d / "shared" / "seed" / "000_19ded2a00a39b9cb.txt" for d in (ROOT.parent, ROOT.parent.parent)
             if (d / "shared" / "seed").is_dir()), ROOT.parent / "shared" / "seed" / "000_19ded2a00a39b9cb.txt")


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
    config = load_config(EXAMPLES / name, env={"worker_id": "0"})  # the manual's ${worker_id}
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
        config = load_config(write(tmp_path, f"manual_{i}.json", block), env={"worker_id": "0"})
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
    c = load_config(EXAMPLES / "distributed_worker.json", env={"worker_id": "3"})
    assert c.server_recv_port == "ipc:///tmp/flexkv_3_test"  # ${worker_id} from the environment
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
