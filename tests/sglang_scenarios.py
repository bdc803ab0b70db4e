"""SGLang 0.5.23's own classes driving FlexKV, on CPU tensors. Run by tests/test_sglang.py in a subprocess:

    python tests/sglang_scenarios.py <workdir> <scenario> [<scenario> ...]

Each scenario prints its seed (``SEED <name> <seed>``), then ``PASS <name>`` or ``FAIL <name>: <why>``; the
seed is tests/kv_helpers.py's seed_for (a hash of the scenario's id unless FLEXKV_TEST_SEED is set), so
``FLEXKV_TEST_SEED=<seed>`` replays a failure. The subprocess keeps SGLang's process-wide
state (its published runtime context, the torchvision stand-in on sys.path, the CUDA stream stand-in that
FlexKV's radix cache needs on a CPU build) away from the other tests.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from array import array
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "sglang_standin"))  # torchvision: import-only stand-in (see its docstring)

import torch  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang.test.parallel_groups import publish  # noqa: E402

PAGE = 4
WORK = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/flexkv-sglang")
publish(ServerArgs(model_path="dummy", page_size=PAGE, enable_flexkv=True), role="scheduler")

from sglang.srt.managers.cache_controller import HiCacheController  # noqa: E402
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str  # noqa: E402

from flexkv.core.errors import ConfigError, LayoutError  # noqa: E402

from kv_helpers import seed_for  # noqa: E402  (this file's folder is on sys.path: it runs as a script there)

BACKEND = {"backend_name": "flexkv", "module_path": "flexkv.adapters.sglang", "class_name": "FlexKVHiCacheStorage",
           "interface_v1": 1}
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
MLA_RANK, MLA_ROPE = 16, 8
SEED = 0  # the running scenario's seed (main sets it, and seeds torch's global generator with it)


def write_config(name: str, *, ssd: bool = False, cpu_blocks: int = 256, tokens_per_block: int = PAGE) -> Path:
    cache = {"tokens_per_block": tokens_per_block, "num_cpu_blocks": cpu_blocks, "enable_ssd": ssd}
    if ssd:
        cache.update(num_ssd_blocks=512, ssd_cache_dir=str(WORK / f"{name}-ssd"))
    path = WORK / f"{name}.json"
    path.write_text(json.dumps({"server_recv_port": f"ipc://{WORK}/{name}", "cache_config": cache}))
    os.environ["FLEXKV_CONFIG_PATH"] = str(path)
    return path


# ------------------------------------------------------------------------------------------- pools


def device_pool(mla: bool, size: int = 64):
    if mla:
        return MLATokenToKVPool(size=size, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=MLA_RANK,
                                qk_rope_head_dim=MLA_ROPE, layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    return MHATokenToKVPool(size=size, page_size=PAGE, dtype=torch.bfloat16, head_num=HEADS, head_dim=HEAD_DIM,
                            layer_num=LAYERS, device="cpu", enable_memory_saver=False)


def host_pool(dev, layout: str, mla: bool):
    info = dev.get_device_pool_infos()[0].buffer_info
    if mla:
        return MLATokenToKVPoolHost(info, host_to_device_ratio=2.0, host_size=0, page_size=PAGE, layout=layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=dev.size, start_layer=0,
                                    end_layer=LAYERS, target_layer_num=LAYERS)
    return MHATokenToKVPoolHost(info, host_to_device_ratio=2.0, host_size=0, page_size=PAGE, layout=layout,
                                pin_memory=False, device="cpu", device_capacity_tokens=dev.size, start_layer=0,
                                end_layer=LAYERS)


def controller(layout: str, mla: bool = False, *, interface_v1: bool = True, model: str = "tiny-model"):
    dev = device_pool(mla)
    alloc = PagedTokenToKVPoolAllocator(size=dev.size, page_size=PAGE, dtype=torch.bfloat16, device="cpu",
                                        kvcache=dev, need_sort=False)
    host = host_pool(dev, layout, mla)
    host.kv_buffer.view(torch.uint8).copy_(torch.randint(0, 256, host.kv_buffer.view(torch.uint8).shape,
                                                         dtype=torch.uint8))
    extra = dict(BACKEND, interface_v1=1 if interface_v1 else 0)
    ctrl = HiCacheController(alloc, host, PAGE, tp_group=None, load_cache_event=threading.Event(), io_backend="direct",
                             storage_backend="dynamic", model_name=model, storage_backend_extra_config=extra)
    return ctrl, host


def flat_pages(host, indices) -> list:
    return [host.get_data_page(int(i), flat=True).clone() for i in indices.tolist()[::PAGE]]


def backup(ctrl, host, tokens: list[int]):
    """SGLang's write-through of host pages to the storage backend (controller's _page_backup)."""
    hidx = host.alloc(len(tokens))
    ctrl.write_storage(hidx, tokens, hash_value=get_hash_str(tokens, None, page_size=PAGE))
    op = ctrl.ack_backup_queue.get(timeout=30)
    return hidx, op.completed_tokens


def prefetch(ctrl, host, tokens: list[int], poison: bool = True):
    """SGLang's prefetch (controller's _storage_hit_query, then _page_transfer) into fresh host pages."""
    ctrl.prefetch(f"req-{id(tokens)}-{len(tokens)}", tokens)
    op = ctrl.prefetch_hit_queue.get(timeout=30)
    hit = op.storage_hit_count
    if hit == 0:
        return None, 0, 0
    dest = host.alloc(hit)
    if poison:
        bad = torch.full_like(host.get_data_page(0, flat=True), 0)
        bad.view(torch.uint8).fill_(0xA5)
        for i in dest.tolist()[::PAGE]:
            host.set_from_flat_data_page(i, bad)
    op.host_indices = dest
    ctrl.prefetch_buffer.put(op)
    done = 0
    while True:
        ack = ctrl.ack_prefetch_queue.get(timeout=30)
        if ack.completed_tokens:
            done += ack.completed_tokens
        if ack.completed_req:
            break
    return dest, hit, done


def same_pages(host, a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(flat_pages(host, a),
                                                                                    flat_pages(host, b)))


def tokens_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 30000, (n,), generator=g).tolist()


# ------------------------------------------------------------------------------------ HiCache scenarios


def hicache_every_layout_round_trip() -> None:
    """SGLang's factory loads the backend; pages go out and back through the controller, byte-exact."""
    from flexkv.adapters.sglang import FlexKVHiCacheStorage

    for mla, layouts in ((False, ("layer_first", "page_first", "page_first_direct", "page_head")),
                         (True, ("layer_first", "page_first", "page_first_direct"))):
        for layout in layouts:
            write_config(f"layout-{layout}-{int(mla)}")
            ctrl, host = controller(layout, mla)
            try:
                assert isinstance(ctrl.storage_backend, FlexKVHiCacheStorage), type(ctrl.storage_backend)
                tokens = tokens_of(5 * PAGE, SEED)
                src, stored = backup(ctrl, host, tokens)
                assert stored == len(tokens), (layout, mla, stored)
                dest, hit, done = prefetch(ctrl, host, tokens)
                assert hit == len(tokens) and done == len(tokens), (layout, mla, hit, done)
                assert same_pages(host, src, dest), f"{layout} (mla={mla}) pages differ after the round trip"
                stats = ctrl.storage_backend.flexkv_stats()
                assert stats["pages_stored"] == 5 and stats["pages_loaded"] == 5, stats
                assert stats["metrics"]["counters"]["put_stored_blocks"] >= 5, stats
            finally:
                ctrl.detach_storage_backend()


def hicache_survives_a_restart_on_ssd() -> None:
    write_config("restart", ssd=True, cpu_blocks=8)
    tokens = tokens_of(6 * PAGE, SEED)
    ctrl, host = controller("page_first")
    src, stored = backup(ctrl, host, tokens)
    assert stored == len(tokens)
    reference = flat_pages(host, src)
    assert ctrl.storage_backend.store.flush(30)  # stores return before their write-through
    assert ctrl.storage_backend.flexkv_stats()["ssd_writes"] == 6
    ctrl.storage_backend.close()
    ctrl.detach_storage_backend()
    # A new control plane (new backend, new CPU tier, new host pool) finds the pages on SSD.
    ctrl, host = controller("page_first")
    try:
        assert ctrl.storage_backend.store.ssd_restored == 6, ctrl.storage_backend.store.ssd_restored
        dest, hit, done = prefetch(ctrl, host, tokens)
        assert hit == len(tokens) and done == len(tokens), (hit, done)
        got = flat_pages(host, dest)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(reference, got))
        assert ctrl.storage_backend.flexkv_stats()["ssd_reads"] == 6
    finally:
        ctrl.detach_storage_backend()


def hicache_exists_counts_leading_hits() -> None:
    write_config("leading")
    ctrl, host = controller("page_first_direct")
    try:
        backend = ctrl.storage_backend
        tokens = tokens_of(4 * PAGE, SEED)
        keys = get_hash_str(tokens, None, page_size=PAGE)
        hidx = host.alloc(len(tokens))
        assert backend.batch_set_v1([keys[0], keys[2]], torch.cat([hidx[:PAGE], hidx[2 * PAGE:3 * PAGE]])) == \
            [True, True]
        assert backend.batch_exists(keys) == 1
        assert backend.batch_exists(keys[2:]) == 1
        assert backend.batch_exists([keys[1]]) == 0
        assert backend.exists(keys[2]) and not backend.exists(keys[3])
        # The controller's hit query stops at the first page the backend lacks.
        ctrl.prefetch("req-leading", tokens)
        assert ctrl.prefetch_hit_queue.get(timeout=30).storage_hit_count == PAGE
        # A get delivers the leading held pages only.
        assert backend.batch_get_v1(keys[:2], host.alloc(2 * PAGE)) == [True, False]
    finally:
        ctrl.detach_storage_backend()


def hicache_tp_ranks_never_share() -> None:
    """Pages stored for TP size 1 are not found by either rank of TP size 2 (same model, same SSD)."""
    from flexkv.adapters.sglang import FlexKVHiCacheStorage

    write_config("tp", ssd=True)
    tokens = tokens_of(3 * PAGE, SEED)
    keys = get_hash_str(tokens, None, page_size=PAGE)
    dev = device_pool(False)
    host = host_pool(dev, "page_first", False)
    hidx = host.alloc(len(tokens))

    def backend(tp_rank: int, tp_size: int) -> FlexKVHiCacheStorage:
        cfg = HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                   attn_cp_size=1, is_mla_model=False, enable_storage_metrics=False,
                                   is_page_first_layout=True, model_name="tiny-model", extra_config=dict(BACKEND))
        b = FlexKVHiCacheStorage(cfg, {})
        b.register_mem_pool_host(host)
        return b

    tp1 = backend(0, 1)
    assert tp1.batch_set_v1(keys, hidx) == [True] * 3
    tp1.close()
    for rank in (0, 1):
        b = backend(rank, 2)
        assert b.batch_exists(keys) == 0, f"TP rank {rank} of 2 found TP 1 pages"
        b.close()
    again = backend(0, 1)
    assert again.batch_exists(keys) == 3, "TP 1 lost its own pages"
    again.close()


def hicache_legacy_flat_pages() -> None:
    """interface_v1 off: SGLang's generic get/set pass flat pages; the same pages serve the zero-copy calls."""
    for layout in ("layer_first", "page_first"):
        write_config(f"legacy-{layout}")
        ctrl, host = controller(layout, interface_v1=False)
        try:
            assert ctrl.page_get_func.__name__ == "_generic_page_get", ctrl.page_get_func.__name__
            tokens = tokens_of(3 * PAGE, SEED)
            src, stored = backup(ctrl, host, tokens)
            assert stored == len(tokens)
            dest, hit, done = prefetch(ctrl, host, tokens)
            assert hit == done == len(tokens), (hit, done)
            assert same_pages(host, src, dest), f"{layout}: legacy pages differ"
            backend = ctrl.storage_backend
            keys = get_hash_str(tokens, None, page_size=PAGE)
            # Pages the legacy calls stored load through the zero-copy call, byte-exact.
            out = host.alloc(PAGE)
            assert backend.batch_get_v1([keys[1]], out) == [True]
            assert same_pages(host, src[PAGE:2 * PAGE], out)
            # A new page set through the legacy call loads through the zero-copy call.
            page = flat_pages(host, src)[0].clone()
            page.view(torch.uint8).copy_(torch.randint(0, 256, page.view(torch.uint8).shape, dtype=torch.uint8))
            assert backend.set("ab" * 32, page) is True
            out = host.alloc(PAGE)
            assert backend.batch_get_v1(["ab" * 32], out) == [True]
            assert torch.equal(flat_pages(host, out)[0].view(torch.uint8), page.view(torch.uint8))
            assert torch.equal(backend.get(keys[2]).view(torch.uint8), flat_pages(host, src)[2].view(torch.uint8))
            assert backend.get("0" * 64) is None
        finally:
            ctrl.detach_storage_backend()


def hicache_concurrent_threads() -> None:
    write_config("threads", cpu_blocks=512)
    ctrl, host = controller("page_first")
    backend = ctrl.storage_backend
    errors: list[str] = []

    def worker(w: int) -> None:
        try:
            for r in range(10):
                tokens = tokens_of(4 * PAGE, SEED + w * 1000 + r)
                keys = get_hash_str(tokens, None, page_size=PAGE)
                with lock:
                    src, dst = host.alloc(len(tokens)), host.alloc(len(tokens))
                assert backend.batch_set_v1(keys, src) == [True] * 4
                assert backend.batch_exists(keys) == 4
                assert backend.batch_get_v1(keys, dst) == [True] * 4
                assert same_pages(host, src, dst)
                with lock:
                    host.free(src)
                    host.free(dst)
        except Exception as e:  # reported by the main thread
            errors.append(f"worker {w}: {e!r}")

    lock = threading.Lock()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ctrl.detach_storage_backend()
    assert not any(t.is_alive() for t in threads), "a worker did not finish within 120 s"
    assert not errors, errors


def hicache_bad_input_is_refused() -> None:
    from flexkv.adapters.sglang import FlexKVHiCacheStorage
    from flexkv.adapters.sglang.versions import check_sglang_version

    def config(**kw) -> HiCacheStorageConfig:
        base = dict(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=False,
                    enable_storage_metrics=False, is_page_first_layout=True, model_name="m",
                    extra_config=dict(BACKEND))
        base.update(kw)
        return HiCacheStorageConfig(**base)

    write_config("bad", tokens_per_block=3)
    dev = device_pool(False)
    backend = FlexKVHiCacheStorage(config(), {})
    try:
        backend.register_mem_pool_host(host_pool(dev, "page_first", False))
    except ConfigError as e:
        assert "tokens_per_block = 3" in str(e) and "page" in str(e), e
    else:
        raise AssertionError("a page size that does not fit tokens_per_block was accepted")
    write_config("gives-way", tokens_per_block=2)  # divides the page size: the page size wins, with a warning
    backend = FlexKVHiCacheStorage(config(), {})
    backend.register_mem_pool_host(host_pool(dev, "page_first", False))
    assert backend.store.cache_config.tokens_per_block == PAGE
    backend.close()
    write_config("bad2")
    try:
        FlexKVHiCacheStorage(config(is_mla_model=True, tp_size=2, tp_rank=1), {})
    except ConfigError as e:
        assert "tp_size" in str(e), e
    else:
        raise AssertionError("MLA with TP 2 was accepted")
    backend = FlexKVHiCacheStorage(config(), {})
    try:
        backend.register_mem_pool_host(host_pool(device_pool(False), "page_unified", False))
    except LayoutError as e:
        assert "page_unified" in str(e) and "page_head" in str(e), e
    else:
        raise AssertionError("an unsupported host layout was accepted")
    try:
        check_sglang_version("0.5.10")
    except ConfigError as e:
        assert "0.5.16" in str(e), e
    else:
        raise AssertionError("SGLang 0.5.10 was accepted")
    # A backend used before its host pool is registered answers misses, it does not raise.
    fresh = FlexKVHiCacheStorage(config(), {})
    assert fresh.batch_exists(["ab" * 32]) == 0 and fresh.failures == 1


# ----------------------------------------------------------------------------- --enable-flexkv scenarios


class _CpuStream:
    """FlexKV's radix cache makes two CUDA streams and synchronizes one; a CPU build has none."""

    def synchronize(self) -> None:
        pass


def radix_cache(mla: bool, server_args: ServerArgs | None = None):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.storage.flexkv.flexkv_radix_cache import FlexKVRadixCache
    from sglang.srt.runtime_context import get_parallel

    get_parallel().override_permanently(world_group=SimpleNamespace(cpu_group=None))
    torch.cuda.Stream = _CpuStream
    sa = server_args or ServerArgs(model_path="tiny-model", page_size=PAGE, enable_flexkv=True)
    kv = device_pool(mla)
    alloc = PagedTokenToKVPoolAllocator(size=kv.size, page_size=PAGE, dtype=torch.bfloat16, device="cpu",
                                        kvcache=kv, need_sort=False)
    r2t = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc, page_size=PAGE)
    if mla:
        model = SimpleNamespace(num_hidden_layers=LAYERS, attention_arch=SimpleNamespace(name="MLA"),
                                kv_lora_rank=MLA_RANK, qk_rope_head_dim=MLA_ROPE, dtype=torch.bfloat16)
    else:
        model = SimpleNamespace(num_hidden_layers=LAYERS, head_dim=HEAD_DIM, num_key_value_heads=HEADS,
                                dtype=torch.bfloat16)
    cache = FlexKVRadixCache(params=params, model_config=model, server_args=sa, tp_rank=0, tp_size=1, dp_rank=None,
                             pp_rank=0, attn_cp_rank=0)
    return cache, kv, alloc, r2t


def wait_for_stores(cache) -> None:
    """Until FlexKV reports the stores done: SGLang keeps a storing node locked (protected) until the
    scheduler tick (check_hicache_events) sees the store complete, then unlocks it."""
    deadline = time.monotonic() + 30
    while cache.protected_size() and time.monotonic() < deadline:
        cache.check_hicache_events()  # try_wait -> unlock the node
        time.sleep(0.01)
    assert cache.protected_size() == 0, "the store did not complete"


def _buffers(kv) -> list:
    return list(kv.kv_buffer) if hasattr(kv, "kv_buffer") else list(kv.k_buffer) + list(kv.v_buffer)


def radix_round_trip(mla: bool) -> None:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import InitLoadBackParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.test.mem_cache_utils import finish_req

    write_config(f"radix-{int(mla)}")
    cache, kv, alloc, r2t = radix_cache(mla)
    try:
        def make_req(rid: str, tokens: list[int]):
            req = Req(rid=rid, origin_input_text="", origin_input_ids=array("q", tokens),
                      sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
            r2t.alloc([req])
            return req

        tokens = tokens_of(4 * PAGE + 2, SEED)  # 4 whole pages and a tail
        req = make_req("a", tokens)
        slots = alloc.alloc(5 * PAGE)[: len(tokens)]
        r2t.write((req.kv.req_pool_idx, slice(0, len(tokens))), slots)
        for buf in _buffers(kv):  # "prefill": fresh random KV
            buf[slots] = torch.randn(buf[slots].shape, dtype=torch.float32).to(buf.dtype)
        ref = [buf[slots[: 4 * PAGE]].clone() for buf in _buffers(kv)]
        req.kv.kv_committed_len = len(tokens)
        finish_req(cache, req, up_to=len(tokens))  # checkpoint -> put_match + launch; the node stays locked
        wait_for_stores(cache)
        cache.reset()  # SGLang drops its own tree; FlexKV keeps the pages
        for buf in _buffers(kv):
            buf.view(torch.uint8).fill_(0xA5)
        alloc.clear()
        req2 = make_req("b", tokens)
        res = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=req2))
        assert res.device_prefix_len == 0 and res.host_hit_length == 4 * PAGE, (res.device_prefix_len,
                                                                                res.host_hit_length)
        n, node = cache.init_load_back(InitLoadBackParams(best_match_node=res.best_match_node,
                                                          host_hit_length=res.host_hit_length, req=req2))
        assert n == 4 * PAGE, n
        for buf, want in zip(_buffers(kv), ref):
            assert torch.equal(buf[node.value].view(torch.uint8), want.view(torch.uint8)), "loaded KV differs"
        # A different prompt finds nothing.
        other = make_req("c", tokens_of(4 * PAGE, SEED + 1))
        res = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", other.origin_input_ids.tolist())),
                                                   req=other))
        assert res.host_hit_length == 0
    finally:
        cache.shutdown()


def radix_layerwise_round_trip() -> None:
    """FLEXKV_ENABLE_LAYERWISE_TRANSFER=1: SGLang hands FlexKV its eventfds, the load starts in match_prefix,
    and each layer's buffer access in the forward pass returns only once FlexKV signalled that layer."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.test.mem_cache_utils import finish_req

    write_config("radix-layerwise")
    os.environ["FLEXKV_ENABLE_LAYERWISE_TRANSFER"] = "1"
    os.environ["FLEXKV_LAYERWISE_EVENTFD_SOCKET"] = str(WORK / "lw")
    try:
        cache, kv, alloc, r2t = radix_cache(False)
    finally:
        del os.environ["FLEXKV_ENABLE_LAYERWISE_TRANSFER"]
    try:
        assert cache.flexkv_connector.enable_layerwise, "FLEXKV_ENABLE_LAYERWISE_TRANSFER=1 was not taken up"
        tokens = tokens_of(3 * PAGE + 1, SEED)
        req = Req(rid="lw-a", origin_input_text="", origin_input_ids=array("q", tokens),
                  sampling_params=SamplingParams(temperature=0, max_new_tokens=1))
        r2t.alloc([req])
        slots = alloc.alloc(4 * PAGE)[: len(tokens)]
        r2t.write((req.kv.req_pool_idx, slice(0, len(tokens))), slots)
        for buf in _buffers(kv):
            buf[slots] = torch.randn(buf[slots].shape, dtype=torch.float32).to(buf.dtype)
        ref = [buf[slots[: 3 * PAGE]].clone() for buf in _buffers(kv)]
        req.kv.kv_committed_len = len(tokens)
        finish_req(cache, req, up_to=len(tokens))
        wait_for_stores(cache)
        cache.reset()
        for buf in _buffers(kv):
            buf.view(torch.uint8).fill_(0xA5)
        alloc.clear()
        res = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)), req=None))
        assert res.device_prefix_len == 3 * PAGE, res.device_prefix_len
        new_slots = res.last_device_node.value
        waited = []

        def forward() -> None:  # the attention backend reads each layer's buffers in order
            for layer in range(LAYERS):
                kv.get_key_buffer(layer)
                waited.append(layer)

        t = threading.Thread(target=forward, daemon=True)
        t.start()
        t.join(30)
        assert waited == list(range(LAYERS)), f"the forward pass was released for layers {waited} only"
        for buf, want in zip(_buffers(kv), ref):
            assert torch.equal(buf[new_slots].view(torch.uint8), want.view(torch.uint8)), "loaded KV differs"
    finally:
        cache.shutdown()


def radix_mha_round_trip() -> None:
    radix_round_trip(False)


def radix_mla_round_trip() -> None:
    radix_round_trip(True)


def radix_connector_imports_flexkv_names() -> None:
    from sglang.srt.mem_cache.storage.flexkv import flexkv_connector

    import flexkv.integration.config
    import flexkv.server.client
    import flexkv.transfer.layerwise
    import flexkv.transfer_manager

    assert flexkv_connector.FlexKVConfig is flexkv.integration.config.FlexKVConfig
    assert flexkv_connector.KVTPClient is flexkv.server.client.KVTPClient
    assert isinstance(flexkv.transfer.layerwise.build_layerwise_eventfd_socket_path(dp_client_id=0, pp_rank=0,
                                                                                     model_config=None), str)
    from flexkv.core.errors import FlexKVError

    try:
        flexkv.transfer_manager.TransferManagerOnRemote.create_process(master_host="h", master_ports=("1",))
    except FlexKVError as e:  # only FlexKV's refusal counts: an AssertionError below is not caught here
        assert "multi-node" in str(e), e
    else:
        raise AssertionError("multi-node was accepted")


def radix_pp2_is_refused_clearly() -> None:
    """Pipeline parallelism is refused by name (--tp-size 2 is served: tests/test_sglang_tp.py)."""
    write_config("radix-pp2")
    try:
        radix_cache(False, ServerArgs(model_path="tiny-model", page_size=PAGE, enable_flexkv=True, pp_size=2))
    except ConfigError as e:
        assert "--pp-size 2" in str(e), e
    else:
        raise AssertionError("--pp-size 2 was accepted")


SCENARIOS = {f.__name__: f for f in (
    hicache_every_layout_round_trip, hicache_survives_a_restart_on_ssd, hicache_exists_counts_leading_hits,
    hicache_tp_ranks_never_share, hicache_legacy_flat_pages, hicache_concurrent_threads, hicache_bad_input_is_refused,
    radix_mha_round_trip, radix_mla_round_trip, radix_layerwise_round_trip, radix_connector_imports_flexkv_names,
    radix_pp2_is_refused_clearly,
)}


def main(names: list[str]) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    global SEED
    failed = 0
    for name in names or list(SCENARIOS):
        SEED = seed_for(f"tests/sglang_scenarios.py::{name}")
        torch.manual_seed(SEED)  # the scenarios' host and device pools draw from torch's global generator
        print(f"SEED {name} {SEED}", flush=True)
        try:
            SCENARIOS[name]()
            print(f"PASS {name}", flush=True)
        except Exception as e:  # every failure, an AssertionError too, is this scenario's FAIL line
            failed += 1
            traceback.print_exc()
            print(f"FAIL {name}: {e!r} (FLEXKV_TEST_SEED={SEED} replays it)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
