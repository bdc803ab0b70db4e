"""The vLLM adapter's pieces that need no running engine: KV cache layouts vLLM registers, version and
config checks (each a clear error at engine start), and the import paths vLLM uses."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from pathlib import Path
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
    """A vLLM request; its block_hashes stand in for vLLM's (a hash of each whole block's prefix)."""
    hashes = [hashlib.sha256(repr((salt, tokens[: (i + 1) * 32])).encode()).digest() for i in range(len(tokens) // 32)]
    return SimpleNamespace(request_id=rid, all_token_ids=tokens, num_tokens=len(tokens), num_computed_tokens=computed,
                           cache_salt=salt, lora_request=None, block_hashes=hashes)


def done(*orders, failed: tuple = ()) -> SimpleNamespace:
    """A step's connector output in which the worker reports these orders done (or failed)."""
    from flexkv.adapters.vllm.metadata import FlexKVWorkerMetadata

    return SimpleNamespace(kv_connector_worker_meta=FlexKVWorkerMetadata(ok={o.order_id: 1 for o in orders},
                                                                         failed={o.order_id: 1 for o in failed}),
                           finished_sending=None, finished_recving=None)


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
        assert meta.awaiting == ["a"]  # vLLM keeps the blocks until the worker reports the request
        side.update_connector_output(done(meta.orders[0]))

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
        assert side.stats()["keyings"] == 1  # the prompt was keyed once for its lookups and its load
        salted = fake_request("c", tokens, salt="other")
        assert side.get_num_new_matched_tokens(salted, 0) == (0, False)
    finally:
        side.shutdown()


def scheduled(new: list = (), cached: list = (), preempted: tuple = (), tokens: dict | None = None) -> SimpleNamespace:
    """A scheduler output: new requests (rid, block ids, computed), running ones (rid, new block ids, computed)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(b,), num_computed_tokens=c) for r, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _, _ in cached], resumed_req_ids=set(),
                                              new_block_ids=[(b,) if b else None for _, b, _ in cached],
                                              num_computed_tokens=[c for _, _, c in cached]),
        preempted_req_ids=set(preempted), num_scheduled_tokens=dict(tokens or {}))


def test_blocks_are_stored_as_computed_and_preemption_flushes_them(tmp_path, monkeypatch) -> None:
    """Each step orders the blocks its forward fills; a failed copy stores nothing; a preempted request's
    copies in flight are named for the workers to wait for; a request finished with copies in flight is kept
    by vLLM until they are done, and what the workers completed at shutdown is kept."""
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide

    write_config(tmp_path, monkeypatch, 32)
    side = SchedulerSide(settings_from_vllm(fake_vllm_config()))
    try:
        tokens = list(range(7, 7 + 5 * 32 + 3))
        req = fake_request("long", tokens)
        assert side.get_num_new_matched_tokens(req, 0) == (0, False)
        side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([],)), 0)
        # First chunk: 70 tokens fill 2 blocks.
        meta = side.build_connector_meta(scheduled(new=[("long", [5, 6, 7], 0)], tokens={"long": 70}))
        (first,) = meta.orders
        assert first.store and first.engine_blocks == [5, 6]
        # Second chunk: 64 more tokens fill blocks 2 and 3 (block 4 is partial).
        meta = side.build_connector_meta(scheduled(cached=[("long", [8, 9], 70)], tokens={"long": 64}))
        (second,) = meta.orders
        assert second.engine_blocks == [7, 8]
        side.update_connector_output(done(first, failed=(second,)))
        assert side.kv.lookup(tokens, side.reqs["long"].ns, block_hashes=None)[0] == 0  # keyed by vLLM's hashes
        # Preempted: nothing new is ordered for it, and no copy of it is in flight any more.
        meta = side.build_connector_meta(scheduled(preempted=("long",)))
        assert meta.flush == [] and meta.orders == []
        assert side.stats()["preemptions"] == 1
        # Resumed with new blocks: blocks 2 and 3 failed, so they are ordered again, with block 4.
        req.num_computed_tokens = 5 * 32
        meta = side.build_connector_meta(scheduled(new=[("long", [1, 2, 3, 4, 0, 9], 0)], tokens={"long": 163}))
        (third,) = meta.orders
        assert third.engine_blocks == [3, 4, 0]
        # Preempted again while that copy runs: the workers must wait for it.
        assert side.build_connector_meta(scheduled(preempted=("long",))).flush == [third.order_id]
        assert side.request_finished(req, [1, 2, 3, 4, 0, 9]) == (True, None)
        assert side.build_connector_meta(None).awaiting == ["long"]
        Path(side.ledger.receipts).write_text(f"{third.order_id}\n")  # the worker completed it as it stopped
        side.shutdown()
        assert side.stats()["failures"] == 1  # the failed second order
    finally:
        side.shutdown()


def test_store_mode_finished_stores_a_request_only_when_it_ends(tmp_path, monkeypatch) -> None:
    """``flexkv_store_mode: finished``: the steps of a prefill order no copy; the request's end orders every
    block it computed. An unknown mode is refused, naming the key."""
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide

    write_config(tmp_path, monkeypatch, 32)
    config = fake_vllm_config()
    config.kv_transfer_config = SimpleNamespace(kv_connector_extra_config={"flexkv_store_mode": "at_exit"})
    with pytest.raises(ConfigError, match="flexkv_store_mode is 'at_exit'; use one of"):
        settings_from_vllm(config)
    config.kv_transfer_config.kv_connector_extra_config["flexkv_store_mode"] = "finished"
    side = SchedulerSide(settings_from_vllm(config))
    try:
        tokens = list(range(7, 7 + 5 * 32 + 3))
        req = fake_request("long", tokens)
        assert side.get_num_new_matched_tokens(req, 0) == (0, False)
        assert side.build_connector_meta(scheduled(new=[("long", [5, 6, 7], 0)], tokens={"long": 70})).orders == []
        assert side.build_connector_meta(scheduled(cached=[("long", [8, 9], 70)], tokens={"long": 64})).orders == []
        req.num_computed_tokens = 134
        assert side.request_finished(req, [5, 6, 7, 8, 9]) == (True, None)
        (store,) = side.build_connector_meta(None).orders
        assert store.store and store.engine_blocks == [5, 6, 7, 8]
        side.update_connector_output(done(store))
        assert side.stats()["stored_tokens"] == 4 * 32
    finally:
        side.shutdown()


def test_an_order_ends_once_every_worker_reported_it(tmp_path, monkeypatch) -> None:
    """With several workers (each copying its slice), a store becomes readable only when every worker
    reported it done; one failed slice stores nothing. vLLM sums the workers' reports with aggregate()."""
    from flexkv.adapters.vllm.metadata import FlexKVWorkerMetadata
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide

    write_config(tmp_path, monkeypatch, 32)
    side = SchedulerSide(dataclasses.replace(settings_from_vllm(fake_vllm_config()), num_workers=2))
    try:
        for rid, second_ok in (("ok", True), ("bad", False)):
            tokens = list(range(len(rid), len(rid) + 3 * 32 + 1))
            req = fake_request(rid, tokens, computed=3 * 32)
            assert side.request_finished(req, [4, 5, 6, 7]) == (True, None)
            (order,) = side.build_connector_meta(None).orders
            side.update_connector_output(done(order))  # the first worker
            assert len(side.ledger) == 1
            other = FlexKVWorkerMetadata(ok={order.order_id: 1}) if second_ok else \
                FlexKVWorkerMetadata(failed={order.order_id: 1})
            both = FlexKVWorkerMetadata().aggregate(other)
            side.update_connector_output(SimpleNamespace(kv_connector_worker_meta=both, finished_sending={rid},
                                                         finished_recving=None))
            assert len(side.ledger) == 0
            hit = side.get_num_new_matched_tokens(fake_request(rid + "-again", tokens), 0)
            assert hit == ((3 * 32, True) if rid == "ok" else (0, False))
        assert side.stats()["failures"] == 1
        # A step can schedule tokens whose ids are not known yet (async scheduling): only known ones are stored.
        req = fake_request("async", list(range(50, 50 + 40)))
        side.get_num_new_matched_tokens(req, 0)
        meta = side.build_connector_meta(scheduled(new=[("async", [1, 2], 0)], tokens={"async": 64}))
        assert [o.engine_blocks for o in meta.orders] == [[1]]
    finally:
        side.shutdown()


def test_each_attention_layer_waits_for_its_own_layer_only(tmp_path, monkeypatch) -> None:
    """Layer-wise loads: vLLM's attention layer i waits (wait_for_layer_load) for layer i of the step's copies,
    not for the whole copy (the data plane's per-layer copies are tested in test_external_copy.py)."""
    import numpy as np

    from flexkv.adapters.vllm.worker_side import WorkerSide

    write_config(tmp_path, monkeypatch, 32)
    worker = WorkerSide(settings_from_vllm(fake_vllm_config()), SimpleNamespace(cache_config=SimpleNamespace(
        num_gpu_blocks=NB)))
    caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16)
              for i in (2, 0, 1)}
    worker.register_kv_caches(caches)
    waited: list[int] = []
    plane = SimpleNamespace(wait_layer_jobs=lambda jobs, layer: waited.append(layer))
    worker.wait_for_layer_load("model.layers.0.self_attn.attn")  # no layer-wise load this step: no wait
    assert waited == []
    worker.layer_jobs = [(plane, SimpleNamespace(jobs=[7, 8, 9], groups=np.array([0, 1, 2])))]
    for i in range(3):
        worker.wait_for_layer_load(f"model.layers.{i}.self_attn.attn")
    assert waited == [0, 1, 2] and worker.stats()["layer_waits"] == 3


def test_a_step_without_a_forward_reports_its_loads_done_in_that_step(tmp_path, monkeypatch, seed: int) -> None:
    """Asynchronous loads in a step that schedules no token (only requests waiting for their loads): the worker
    waits for them in get_finished (at most NO_FORWARD_LOAD_WAIT_S), so the request is reported in that same
    step, its blocks byte-exact in vLLM's poisoned blocks. The load (16 MiB, on the copy threads) takes longer
    than the step's other calls, so a get_finished that did not wait would find it running."""
    import time

    import numpy as np

    from flexkv.adapters.vllm.metadata import CopyOrder, FlexKVConnectorMetadata
    from flexkv.adapters.vllm.scheduler_side import SchedulerSide
    from flexkv.adapters.vllm.worker_side import NO_FORWARD_LOAD_WAIT_S, WorkerSide

    path = tmp_path / "flexkv.json"
    path.write_text(json.dumps({"cache_config": {"num_cpu_blocks": 512, "tokens_per_block": 32}}))
    monkeypatch.setenv("FLEXKV_CONFIG_PATH", str(path))
    settings = settings_from_vllm(fake_vllm_config())
    side = SchedulerSide(settings)
    worker = WorkerSide(settings, SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=512)))
    try:
        gen = torch.Generator().manual_seed(seed)
        caches = {f"model.layers.{i}.self_attn.attn": torch.randint(-9, 9, (512, H, BS, 2 * D), generator=gen)
                  .to(torch.bfloat16) for i in range(2)}
        worker.register_kv_caches(caches)
        original = {k: v.clone() for k, v in caches.items()}
        tier = side.kv.tier_info()
        engine = np.random.default_rng(seed).permutation(512).tolist()
        store = CopyOrder("s", engine, list(range(512)), store=True, order_id=1, tier=tier)
        worker.start_load_kv(FlexKVConnectorMetadata(orders=[store]))
        worker.wait_for_save(FlexKVConnectorMetadata(orders=[store]))
        assert worker.before_device_sleep() == 1  # waits for the store: only the test's setup
        for t in caches.values():
            t.fill_(-77.0)  # poisoned: a block the load misses cannot pass
        load = CopyOrder("r", engine, list(range(512)), order_id=2, tier=tier)
        worker.start_load_kv(FlexKVConnectorMetadata(orders=[load], no_forward=True))
        worker.wait_for_save(FlexKVConnectorMetadata(orders=[load], no_forward=True))
        t0 = time.monotonic()
        sending, recving = worker.get_finished(set())
        waited = time.monotonic() - t0
        assert NO_FORWARD_LOAD_WAIT_S == 0.005
        assert recving == {"r"} or waited >= 0.005, (recving, waited)
        if recving is None:  # a machine too busy to copy 16 MiB in 5 ms: a later step reports it
            worker.before_device_sleep()
        for name, t in caches.items():
            assert torch.equal(t, original[name])
        assert worker.build_connector_worker_meta().ok == {1: 1, 2: 1}
    finally:
        worker.shutdown()
        side.shutdown()


def test_a_store_ordered_but_not_queued_yet_holds_its_finished_request_back() -> None:
    """With speculative decoding vLLM asks get_finished before wait_for_save queues the step's stores: a finished
    request whose tail store is ordered but not queued must not be reported in finished_sending (vLLM would free
    the blocks the store is about to copy)."""
    from flexkv.adapters.vllm.metadata import CopyOrder
    from flexkv.adapters.vllm.worker_jobs import JobBook

    book = JobBook()
    order = CopyOrder("r", [1], [2], store=True, order_id=7)
    book.awaiting.add("r")
    book.expect(order)  # start_load_kv saw it
    assert book.finished_sending({"r"}) == set()
    book.started(order, [("tier", 1)])  # wait_for_save queued it
    assert book.finished_sending(set()) == set()
    book.job_done(("tier", 1), "")
    assert book.finished_sending(set()) == {"r"}
    assert book.take_report().ok == {7: 1}


def test_an_abandoned_copy_is_reported_failed_only_once_it_ends() -> None:
    """A preempted request's store still running after the wait is failed (its source blocks may be overwritten),
    but reported only when its copy ends: until then the control plane keeps the CPU blocks it writes into."""
    from flexkv.adapters.vllm.metadata import CopyOrder
    from flexkv.adapters.vllm.worker_jobs import JobBook

    book = JobBook()
    order = CopyOrder("r", [1], [2], store=True, order_id=9)
    book.started(order, [("tier", 4)])
    book.abandon([9], "preempted")
    assert book.take_report() is None and book.jobs_of([9]) == {("tier", 4)}
    book.job_done(("tier", 4), "")  # the copy itself succeeded, too late
    report = book.take_report()
    assert report.failed == {9: 1} and report.ok == {}
