"""The vLLM adapter's pieces that need no running engine: KV cache layouts vLLM registers, version and
config checks (each a clear error at engine start), and the import paths vLLM uses."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

from flexkv.adapters.vllm.config import model_config_for, settings_from_vllm
from flexkv.adapters.vllm.kv_layout import layout_from_kv_caches
from flexkv.adapters.vllm.versions import check_vllm_version
from flexkv.core.errors import ConfigError, LayoutError

NB, BS, H, D = 12, 32, 2, 64


def test_vllm_finds_both_connector_classes() -> None:
    impl = importlib.import_module("flexkv.integration.vllm.vllm_v1_adapter").FlexKVConnectorV1Impl
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from flexkv.adapters.vllm import FlexKVConnectorImpl, FlexKVConnectorV1

    assert impl is FlexKVConnectorImpl
    assert issubclass(FlexKVConnectorV1, KVConnectorBase_V1)


def test_gpu_style_layers_split_k_and_v() -> None:
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, NB, BS, H, D, dtype=torch.bfloat16)
              for i in (1, 0)}
    layout, tag, layers = layout_from_kv_caches(caches, NB)
    assert layers == 2 and layout.num_blocks == NB
    assert layout.block_bytes == 2 * 2 * BS * H * D * 2
    assert layout.grouped_segments()[:, 4].tolist() == [0, 0, 1, 1]
    assert layout.segments[0, 0] == caches["model.layers.0.self_attn.attn"].data_ptr()  # layer order, not dict
    assert "kv-split" in tag


def test_cpu_backend_layers_copy_whole_blocks() -> None:
    caches = {f"model.layers.{i}.attn": torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16) for i in range(3)}
    layout, tag, layers = layout_from_kv_caches(caches, NB)
    assert layers == 3 and len(layout.segments) == 3 and "block-first" in tag
    assert (layout.segments[:, 3] == H * BS * 2 * D * 2).all()


def test_layouts_flexkv_cannot_copy_are_refused_at_registration() -> None:
    with pytest.raises(LayoutError, match="differ in KV cache shape"):
        layout_from_kv_caches({"layers.0.a": torch.zeros(NB, H, BS, 2 * D), "layers.1.a": torch.zeros(NB, H, BS, D)})
    with pytest.raises(LayoutError, match=r"expects \[2, 12, \.\.\.\] or \[12, \.\.\.\]"):
        layout_from_kv_caches({"layers.0.a": torch.zeros(5, H, BS, 2 * D)}, NB)
    permuted = torch.zeros(BS, NB, H, 2 * D).transpose(0, 1)  # a block is not contiguous
    with pytest.raises(LayoutError, match="not contiguous"):
        layout_from_kv_caches({"layers.0.a": permuted}, NB)
    with pytest.raises(LayoutError, match="registered no KV cache"):
        layout_from_kv_caches({})


def test_old_vllm_is_refused() -> None:
    with pytest.raises(ConfigError, match="vLLM 0.16.2 is too old"):
        check_vllm_version("0.16.2")
    check_vllm_version("0.32.0")
    check_vllm_version("1.0.0rc1")


def fake_vllm_config(block_size: int = 32, tp: int = 1, cache_dtype: str = "auto", pp: int = 1) -> SimpleNamespace:
    model = SimpleNamespace(model="/models/tiny", dtype=torch.bfloat16, use_mla=False,
                            get_num_layers=lambda p: 2, get_num_kv_heads=lambda p: 2, get_head_size=lambda: 64)
    parallel = SimpleNamespace(world_size=tp * pp, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                               data_parallel_size=1)
    return SimpleNamespace(model_config=model, parallel_config=parallel,
                           cache_config=SimpleNamespace(block_size=block_size, cache_dtype=cache_dtype))


def write_config(tmp_path, monkeypatch, tokens_per_block: int) -> None:
    path = tmp_path / "flexkv.json"
    path.write_text(json.dumps({"cache_config": {"num_cpu_blocks": 64, "tokens_per_block": tokens_per_block}}))
    monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(path))


def test_engine_settings_come_from_vllm(tmp_path, monkeypatch) -> None:
    write_config(tmp_path, monkeypatch, 16)  # a divisor of vLLM's block size: one FlexKV block is one vLLM block
    s = settings_from_vllm(fake_vllm_config(block_size=32))
    assert s.cache_config.tokens_per_block == 32 and s.cache_config.num_cpu_blocks == 64
    assert (s.num_layers, s.num_kv_heads, s.head_size, s.kv_dtype) == (2, 2, 64, torch.bfloat16)
    assert s.layout_tag.startswith("vllm:") and s.model_name == "/models/tiny"


def test_tensor_parallel_workers_each_hold_their_heads_of_every_block(tmp_path, monkeypatch) -> None:
    """vLLM's num_kv_heads is per worker: a FlexKV block holds every worker's heads, and each worker's layout
    covers its own slice of every host chunk, the two slices together the whole block."""
    write_config(tmp_path, monkeypatch, 32)
    s = settings_from_vllm(fake_vllm_config(tp=2))
    model = model_config_for(s)
    assert (s.tp_size, model.num_kv_heads, model.tp_size) == (2, 4, 2)
    covered = []
    for rank in range(2):
        kv = {f"model.layers.{i}.self_attn": torch.zeros(8, 2, 32, 128, dtype=torch.bfloat16) for i in range(2)}
        layout, _, _ = layout_from_kv_caches(kv, 8, tp_size=2, tp_rank=rank)
        assert layout.block_bytes == model.block_bytes(32)
        layout.validate()
        covered += [(int(off), int(off + n)) for _, _, off, n in layout.segments]
    covered.sort()
    assert covered[0][0] == 0 and covered[-1][1] == model.block_bytes(32)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap


def test_tensor_parallel_engines_host_no_rank_dispatcher(tmp_path, monkeypatch) -> None:
    """vLLM's workers copy through the orders they get, each its own heads: a TP=2 engine's manager hosts no
    rank dispatcher (which would take a fixed endpoint, so a second engine on the node could not start)."""
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide

    write_config(tmp_path, monkeypatch, 32)
    sides = [SchedulerSide(settings_from_vllm(fake_vllm_config(tp=2))) for _ in range(2)]
    try:
        assert all(not s.kv.uses_ranks and s.kv.model_config.tp_size == 2 for s in sides)
    finally:
        for s in sides:
            s.shutdown()


def test_engine_settings_that_cannot_work_are_refused(tmp_path, monkeypatch) -> None:
    write_config(tmp_path, monkeypatch, 48)
    with pytest.raises(ConfigError, match="tokens_per_block = 48 and vLLM's block_size = 32"):
        settings_from_vllm(fake_vllm_config())
    write_config(tmp_path, monkeypatch, 32)
    with pytest.raises(ConfigError, match="pipeline_parallel_size=2"):
        settings_from_vllm(fake_vllm_config(pp=2))
    with pytest.raises(ConfigError, match="kv_cache_dtype is 'fp8'"):
        settings_from_vllm(fake_vllm_config(cache_dtype="fp8"))
    monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        settings_from_vllm(fake_vllm_config())


def fake_request(rid: str, tokens: list[int], computed: int = 0, salt: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, all_token_ids=tokens, num_tokens=len(tokens), num_computed_tokens=computed,
                           cache_salt=salt, lora_request=None)


def test_scheduler_side_releases_everything_of_aborted_and_finished_requests(tmp_path, monkeypatch) -> None:
    """The scheduler side's bookkeeping over a request's life: a stored prompt is found again, an aborted
    request's load is still ended when the worker reports it, and no CPU block stays locked."""
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide

    write_config(tmp_path, monkeypatch, 32)
    side = SchedulerSide(settings_from_vllm(fake_vllm_config()))
    try:
        tokens = list(range(100, 100 + 4 * 32 + 5))
        first = fake_request("a", tokens, computed=len(tokens) - 1)
        assert side.request_finished(first, [10, 11, 12, 13, 14]) == (True, None)  # 4 whole blocks to store
        meta = side.build_connector_meta(None)
        assert [o.engine_blocks for o in meta.orders] == [[10, 11, 12, 13]] and meta.orders[0].store
        side.update_connector_output(SimpleNamespace(finished_sending={"a"}, finished_recving=None))

        again = fake_request("b", tokens)
        assert side.get_num_new_matched_tokens(again, 0) == (4 * 32, True)
        assert side.get_num_new_matched_tokens(again, 0) == (4 * 32, True)  # asking twice changes nothing
        assert side.kv.cache_stats()["cpu"]["num_locked"] == 0
        blocks = SimpleNamespace(get_block_ids=lambda: ([20, 21, 22, 23, 24],))
        side.update_state_after_alloc(again, blocks, 4 * 32)
        load = side.build_connector_meta(None).orders[0]
        assert load.engine_blocks == [20, 21, 22, 23] and not load.store and not load.error_blocks
        assert side.kv.cache_stats()["cpu"]["num_locked"] == 4
        assert side.request_finished(again, []) == (False, None)  # aborted while loading
        side.update_connector_output(SimpleNamespace(finished_sending=None, finished_recving={"b"}))
        assert side.kv.cache_stats()["cpu"]["num_locked"] == 0
        salted = fake_request("c", tokens, salt="other")
        assert side.get_num_new_matched_tokens(salted, 0) == (0, False)
    finally:
        side.shutdown()
