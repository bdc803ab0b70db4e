"""The GPU data plane (GpuCopyEngine) on a real CUDA device: byte-exact block copies for every engine layout,
both paths (copy kernel, copy engine), both directions.

The reference is the host copy engine, already checked byte for byte against the CPU tier: each GPU copy is
repeated on a CPU mirror of the engine tensors with HostCopyEngine, and the two results must be equal. Data is
fresh random bytes in every check; destinations are poisoned first, and blocks outside the copy must keep
their poison. Marked ``gpu``: deselected by default, run with ``pytest -m gpu`` on the GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flexkv import _core
from flexkv.core.cpu_tier import CpuTier
from flexkv.core.errors import LayoutError
from flexkv.core.layout import EngineLayout, KVCacheLayout, KVCacheLayoutType

pytestmark = pytest.mark.gpu

POISON = 0xA5
PATHS = ["staged", "kernel", "copy_engine", "memcpy_per_chunk"]


@pytest.fixture(autouse=True)
def _require_cuda() -> None:
    if not (_core.CUDA_BUILT and torch.cuda.is_available()):
        pytest.fail("gpu tests need a CUDA build of FlexKV and a CUDA device (run them on the GPU machine)")


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """This file's generator draws on the GPU (conftest's draws on the CPU); the seed is conftest's, printed."""
    return torch.Generator(device="cuda").manual_seed(seed)


def random_bytes_(t: torch.Tensor, gen: torch.Generator) -> None:
    """Fills a contiguous tensor with random bytes (any dtype; NaN patterns included)."""
    raw = t.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, device=t.device, generator=gen))


@dataclass
class Case:
    """An engine's KV memory: GPU tensors, their CPU mirror, and how to build the layout from either."""

    gpu: list[torch.Tensor]
    build: Callable[[list[torch.Tensor]], EngineLayout]

    def cpu(self) -> list[torch.Tensor]:
        return [t.cpu() for t in self.gpu]


def make_case(kind: str, blocks: int, gen: torch.Generator, dtype: torch.dtype = torch.bfloat16, layers: int = 3,
              tpb: int = 16, heads: int = 2, head: int = 64) -> Case:
    dev = "cuda"

    def fresh(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, dtype=dtype, device=dev)
        random_bytes_(t, gen)
        return t

    if kind in ("vllm_layerfirst", "vllm_layerblock", "blockfirst"):
        lay_type = {"vllm_layerfirst": KVCacheLayoutType.LAYERFIRST, "vllm_layerblock": KVCacheLayoutType.LAYERBLOCK,
                    "blockfirst": KVCacheLayoutType.BLOCKFIRST}[kind]
        kv_layout = KVCacheLayout(lay_type, layers, blocks, tpb, heads, head)
        if lay_type is KVCacheLayoutType.BLOCKFIRST:
            tensors = [fresh(*kv_layout.kv_shape)]
            return Case(tensors, lambda ts: EngineLayout.from_kv_layout(ts[0], kv_layout))
        shape = kv_layout.kv_shape[1:]
        tensors = [fresh(*shape) for _ in range(layers)]
        return Case(tensors, lambda ts: EngineLayout.from_kv_layout(ts, kv_layout))
    if kind == "mla":  # one latent per token and layer: [num_blocks, block_size, latent]
        tensors = [fresh(blocks, tpb, 576) for _ in range(layers)]
        return Case(tensors, lambda ts: EngineLayout.from_block_views(ts, "MLA", layers=list(range(layers))))
    if kind == "sglang":  # per-layer token-indexed K and V buffers; a page is tpb consecutive tokens
        tensors = [fresh(blocks * tpb, heads, head) for _ in range(2 * layers)]

        def build(ts: list[torch.Tensor]) -> EngineLayout:
            views = [t.view(blocks, tpb * heads * head) for t in ts]  # K of every layer, then V
            order = [i for layer in range(layers) for i in (layer, layers + layer)]
            return EngineLayout.from_block_views([views[i] for i in order], "SGLang",
                                                 layers=[i % layers for i in order])
        return Case(tensors, build)
    if kind == "trtllm":  # one pool [num_blocks, layers, 2, tpb*heads*head]: a block is contiguous
        tensors = [fresh(blocks, layers, 2, tpb * heads * head)]
        return Case(tensors, lambda ts: EngineLayout.from_block_views(ts, "TRT-LLM", layers=[layers - 1]))
    raise AssertionError(kind)


LAYOUTS = ["vllm_layerfirst", "vllm_layerblock", "blockfirst", "mla", "sglang", "trtllm"]


class Host:
    """A CPU tier's memory (a memfd mapping) for the GPU engine and a plain array for the reference."""

    def __init__(self, num_blocks: int, block_bytes: int) -> None:
        self.tier = CpuTier(num_blocks, block_bytes, 0.0)
        self.view = self.tier.blocks()
        self.ref = np.empty_like(self.view)
        self.num_blocks, self.block_bytes = num_blocks, block_bytes

    def poison(self) -> None:
        self.view[:] = POISON
        self.ref[:] = POISON

    def close(self) -> None:
        self.tier.close()


def gpu_engine(path: str, host: Host, sms: int = 8, stage_slot_bytes: int = 8 << 20) -> _core.GpuCopyEngine:
    engine = _core.GpuCopyEngine(torch.cuda.current_device(), path, path, sms, sms, stage_slot_bytes)
    engine.register_host(host.tier.base, host.num_blocks * host.tier.block_stride)
    return engine


def register(engine: _core.CopyEngine, layout: EngineLayout, host: Host) -> int:
    """The layout's id in the GPU engine (registered against the CPU tier)."""
    return engine.register_layout(layout.grouped_segments(), layout.num_blocks, host.tier.base,
                                  host.tier.block_stride, host.num_blocks)


def run_gpu(engine, direction: str, layout: EngineLayout, host: Host, eng_ids, host_ids, layerwise=False) -> None:
    layout_id = register(engine, layout, host)
    job = engine.submit(direction, layout_id, np.asarray(eng_ids, np.int64), np.asarray(host_ids, np.int64),
                        direction == "host_to_engine", layerwise, tag=77)
    assert engine.next_completion(30_000_000) == (job, 77, "")
    engine.unregister_layout(layout_id)


def run_ref(direction: str, layout: EngineLayout, host: Host, eng_ids, host_ids) -> None:
    ref = _core.HostCopyEngine(2)
    ref.register_host(host.ref.ctypes.data, host.ref.nbytes)
    layout_id = ref.register_layout(layout.segments, layout.num_blocks, host.ref.ctypes.data, host.block_bytes,
                                    host.num_blocks)
    assert ref.wait(ref.submit(direction, layout_id, np.asarray(eng_ids, np.int64), np.asarray(host_ids, np.int64)))


def block_lists(kind: str, engine_blocks: int, host_blocks: int, rng: np.random.Generator):
    if kind == "single":
        return [int(rng.integers(engine_blocks))], [int(rng.integers(host_blocks))]
    n = {"unsorted": min(engine_blocks, host_blocks) // 2, "runs": min(engine_blocks, host_blocks) // 2,
         "all": min(engine_blocks, host_blocks)}[kind]
    if kind == "runs":  # consecutive runs on both sides, as a long prefix usually is
        start_e, start_h = rng.integers(0, engine_blocks - n + 1), rng.integers(0, host_blocks - n + 1)
        e = np.arange(start_e, start_e + n)
        h = np.arange(start_h, start_h + n)
        cut = n // 3  # two runs, the second first
        return np.concatenate([e[cut:], e[:cut]]), np.concatenate([h[cut:], h[:cut]])
    return rng.permutation(engine_blocks)[:n], rng.permutation(host_blocks)[:n]


def check_round_trip(case: Case, path: str, lists: str, gen: torch.Generator, rng: np.random.Generator,
                     host_blocks: int, layerwise: bool = False, stage_slot_bytes: int = 8 << 20) -> None:
    layout = case.build(case.gpu)
    mirror = case.cpu()
    ref_layout = case.build(mirror)
    host = Host(host_blocks, layout.block_bytes)
    try:
        engine = gpu_engine(path, host, stage_slot_bytes=stage_slot_bytes)
        eng_ids, host_ids = block_lists(lists, layout.num_blocks, host_blocks, rng)
        # Engine -> host: the host blocks must equal what the host copy engine makes of the CPU mirror.
        host.poison()
        run_gpu(engine, "engine_to_host", layout, host, eng_ids, host_ids)
        run_ref("engine_to_host", ref_layout, host, eng_ids, host_ids)
        np.testing.assert_array_equal(host.view, host.ref)
        untouched = np.setdiff1d(np.arange(host_blocks), host_ids)
        assert (host.view[untouched] == POISON).all()
        # Host -> engine, with fresh random host bytes, into poisoned engine memory.
        host.view[:] = rng.integers(0, 256, size=host.view.shape, dtype=np.uint8)
        host.ref[:] = host.view
        for t, m in zip(case.gpu, mirror):
            t.view(torch.uint8).fill_(POISON)
            m.copy_(t.cpu())
        load_e, load_h = rng.permutation(np.asarray(eng_ids)), np.asarray(host_ids)
        run_gpu(engine, "host_to_engine", layout, host, load_e, load_h, layerwise=layerwise)
        run_ref("host_to_engine", ref_layout, host, load_e, load_h)
        torch.cuda.synchronize()
        for t, m in zip(case.gpu, mirror):
            assert torch.equal(t.cpu().view(torch.uint8), m.view(torch.uint8))
        del engine
    finally:
        host.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_trip_every_layout_and_path(kind: str, path: str, gen: torch.Generator,
                                          rng: np.random.Generator) -> None:
    for lists in ("unsorted", "runs", "single"):
        check_round_trip(make_case(kind, 48, gen), path, lists, gen, rng, host_blocks=64)


@pytest.mark.parametrize("path", ["staged", "kernel", "copy_engine"])
def test_thousands_of_blocks(path: str, gen: torch.Generator, rng: np.random.Generator) -> None:
    case = make_case("vllm_layerfirst", 3000, gen, layers=2, tpb=4, heads=1, head=64)
    check_round_trip(case, path, "all", gen, rng, host_blocks=3000)
    check_round_trip(case, path, "unsorted", gen, rng, host_blocks=4096)


@pytest.mark.parametrize("slot_blocks", [2, 3, 7])
def test_staged_jobs_cycle_slots_of_a_few_blocks(slot_blocks: int, gen: torch.Generator,
                                                 rng: np.random.Generator) -> None:
    """Slots of 2, 3 or 7 blocks of 16 chunks (a job is staged from 32 chunks per slot on): a job spans many
    slot groups and wraps the 4-slot ring many times."""
    case = make_case("vllm_layerfirst", 120, gen, layers=8)
    slot = slot_blocks * case.build(case.gpu).block_bytes
    for lists in ("unsorted", "runs", "all"):
        check_round_trip(case, "staged", lists, gen, rng, host_blocks=160, stage_slot_bytes=slot)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head,dtype", [(5, torch.float16), (3, torch.float16), (3, torch.uint8), (7, torch.uint8)],
                         ids=["8B", "4B-or-8B", "1B", "1B-odd"])
def test_chunks_that_are_not_16_byte_multiples(head: int, dtype: torch.dtype, path: str, gen: torch.Generator,
                                               rng: np.random.Generator) -> None:
    case = make_case("vllm_layerfirst", 40, gen, dtype=dtype, layers=2, tpb=4, heads=1, head=head)
    check_round_trip(case, path, "unsorted", gen, rng, host_blocks=50)


@pytest.mark.parametrize("path", ["staged", "kernel", "copy_engine"])
def test_layerwise_load_is_exact_and_each_layer_event_waits(path: str, gen: torch.Generator,
                                                          rng: np.random.Generator) -> None:
    check_round_trip(make_case("vllm_layerfirst", 32, gen, layers=4), path, "unsorted", gen, rng, host_blocks=40,
                     layerwise=True)
    # Each layer's event: after wait_group(layer), that layer is complete (checked on the host right then).
    case = make_case("vllm_layerblock", 64, gen, layers=4)
    layout = case.build(case.gpu)
    host = Host(64, layout.block_bytes)
    try:
        engine = gpu_engine(path, host)
        host.view[:] = rng.integers(0, 256, size=host.view.shape, dtype=np.uint8)
        ids = rng.permutation(64)
        for t in case.gpu:
            t.view(torch.uint8).fill_(POISON)
        job = engine.submit("host_to_engine", register(engine, layout, host), ids, ids, True, True)
        per_layer = layout.block_bytes // 4
        for layer in range(4):
            engine.wait_group(job, layer)
            got = case.gpu[layer].view(torch.uint8).view(64, -1).cpu().numpy()
            want = host.view[:, layer * per_layer:(layer + 1) * per_layer]
            np.testing.assert_array_equal(got[ids], want[ids])
        s = torch.cuda.Stream()
        engine.stream_wait_group(job, 3, s.cuda_stream)
        assert engine.wait(job, 30_000_000)
        engine.stream_wait_group(job, 0, s.cuda_stream)  # a collected job is complete: returns at once
        s.synchronize()
    finally:
        host.close()


@pytest.mark.parametrize("path", ["staged", "kernel", "copy_engine"])
def test_tp_ranks_each_move_their_slice(path: str, gen: torch.Generator, rng: np.random.Generator) -> None:
    """Two TP ranks (half the heads each) store into the same host blocks, which then hold
    [layer][k|v][rank][tokens, heads/2, head]; each rank loads exactly its own heads back."""
    L, B, T, H, D, tp = 3, 24, 16, 4, 32, 2
    half = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, L, B, T, H // tp, D)
    ranks = [[torch.empty(half.kv_shape[1:], dtype=torch.bfloat16, device="cuda") for _ in range(L)]
             for _ in range(tp)]
    for t in (t for rank in ranks for t in rank):
        random_bytes_(t, gen)
    layouts = [EngineLayout.from_kv_layout(ranks[r], half, tp_size=tp, tp_rank=r) for r in range(tp)]
    block_bytes = L * 2 * T * H * D * 2
    for lay in layouts:
        lay.validate()
        assert lay.block_bytes == block_bytes
    host = Host(32, block_bytes)
    try:
        engine = gpu_engine(path, host)
        ids, hids = rng.permutation(B)[:16], rng.permutation(32)[:16]
        host.poison()
        for r in range(tp):
            run_gpu(engine, "engine_to_host", layouts[r], host, ids, hids)
        index = torch.as_tensor(ids, device="cuda")
        want = torch.cat([ranks[r][layer][kv].index_select(0, index).reshape(len(ids), -1).view(torch.uint8).cpu()
                          for layer in range(L) for kv in range(2) for r in range(tp)], dim=1)
        np.testing.assert_array_equal(host.view[hids], want.numpy())
        for r in range(tp):
            saved = [t.clone() for t in ranks[r]]
            for t in ranks[r]:
                t.view(torch.uint8).fill_(POISON)
            run_gpu(engine, "host_to_engine", layouts[r], host, ids, hids)
            for t, s in zip(ranks[r], saved):
                assert torch.equal(t[:, index].view(torch.uint8), s[:, index].view(torch.uint8))
                others = torch.ones(B, dtype=torch.bool, device="cuda")
                others[index] = False
                assert (t[:, others].view(torch.uint8) == POISON).all()
    finally:
        host.close()


@pytest.mark.parametrize("path", ["staged", "kernel"])
def test_load_and_store_run_at_once_in_both_directions(path: str, gen: torch.Generator,
                                                       rng: np.random.Generator) -> None:
    case = make_case("vllm_layerfirst", 256, gen, layers=4)
    layout = case.build(case.gpu)
    host = Host(512, layout.block_bytes)
    try:
        # Small slots for the staged path (4 blocks of 8 chunks: 32 chunks, the least it stages): each
        # direction's jobs cycle its ring many times, both at once.
        engine = gpu_engine(path, host, stage_slot_bytes=4 * layout.block_bytes)
        host.view[:256] = rng.integers(0, 256, size=host.view[:256].shape, dtype=np.uint8)
        src = [t.clone() for t in case.gpu]
        store_ids, load_ids = np.arange(128), np.arange(128, 256)
        for t in case.gpu:
            t[:, 128:].fill_(float("nan"))
        layout_id = register(engine, layout, host)
        a = engine.submit("engine_to_host", layout_id, store_ids, 256 + store_ids, False, False, tag=1)
        b = engine.submit("host_to_engine", layout_id, load_ids, load_ids - 128, True, False, tag=2)
        assert {engine.next_completion(30_000_000), engine.next_completion(30_000_000)} == {(a, 1, ""), (b, 2, "")}
        torch.cuda.synchronize()
        lay_cpu = case.build([t.cpu() for t in src])
        ref = Host(512, layout.block_bytes)
        try:
            ref.ref[:] = host.view
            run_ref("engine_to_host", lay_cpu, ref, store_ids, 256 + store_ids)
            np.testing.assert_array_equal(host.view[256:384], ref.ref[256:384])
        finally:
            ref.close()
        per_layer = layout.block_bytes // 4
        for layer in range(4):
            got = case.gpu[layer][:, 128:256].permute(1, 0, 2, 3, 4).reshape(128, -1).cpu()
            want = host.view[:128, layer * per_layer:(layer + 1) * per_layer]
            np.testing.assert_array_equal(got.view(torch.uint8).numpy(), want)
    finally:
        host.close()


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_block_ids_queue_nothing(gen: torch.Generator) -> None:
    case = make_case("vllm_layerfirst", 8, gen)
    layout = case.build(case.gpu)
    host = Host(8, layout.block_bytes)
    try:
        engine = gpu_engine("kernel", host)
        host.poison()
        segs = layout.grouped_segments()
        base, stride = host.tier.base, host.tier.block_stride
        layout_id = register(engine, layout, host)
        for e, h, what in (([0, 8], [0, 1], "engine block id 8"), ([0, 1], [0, -1], "host block id -1")):
            with pytest.raises(IndexError, match=what):
                engine.submit("engine_to_host", layout_id, np.array(e), np.array(h))
        with pytest.raises(ValueError, match="unknown layout id"):
            engine.submit("engine_to_host", layout_id + 5, np.array([0]), np.array([0]))
        assert (host.view == POISON).all()  # nothing was copied, not even the good first block
        assert engine.in_flight == 0 and engine.next_completion(0) is None
        with pytest.raises(ValueError, match="not registered"):
            engine.register_layout(segs, 8, base + stride * 8, stride, 8)
        with pytest.raises(ValueError, match="differ in length"):
            engine.submit("engine_to_host", layout_id, np.array([0, 1]), np.array([0]))
    finally:
        host.close()


def test_layouts_that_are_not_device_memory_are_refused(gen: torch.Generator) -> None:
    case = make_case("vllm_layerfirst", 8, gen)
    layout = case.build(case.gpu)
    host = Host(8, layout.block_bytes)
    try:
        engine = gpu_engine("kernel", host)
        cpu_layout = case.build(case.cpu())
        with pytest.raises(ValueError, match="not memory of CUDA device"):
            engine.register_layout(cpu_layout.grouped_segments(), 8, host.tier.base, host.tier.block_stride, 8)
        big = layout.grouped_segments()
        with pytest.raises(ValueError, match="not memory of CUDA device|not CUDA memory"):
            engine.register_layout(big, 8 * 1000, host.tier.base, host.tier.block_stride, 8)  # blocks past the end
    finally:
        host.close()
    with pytest.raises(ValueError, match="device 99 does not exist"):
        _core.GpuCopyEngine(99)
    with pytest.raises(ValueError, match="path_h2d must be"):
        _core.GpuCopyEngine(0, "dma")


def test_mixed_devices_and_non_contiguous_blocks_are_refused(gen: torch.Generator) -> None:
    g = torch.empty(4, 2, 16, 2, 8, device="cuda")
    c = torch.empty(4, 2, 16, 2, 8)
    with pytest.raises(LayoutError, match="lives on cpu, kv_caches\\[0\\] on cuda"):
        EngineLayout.from_block_views([g, c])
    with pytest.raises(LayoutError, match="not contiguous"):
        EngineLayout.from_block_views([g.transpose(1, 2)])


# ------------------------------------------------------------------------------------------- KVManager


@pytest.mark.parametrize("ce", [False, True], ids=["kernel", "copy_engine"])
def test_kv_manager_round_trip_on_cuda_tensors(make_kv, ce: bool, gen: torch.Generator,
                                              rng: np.random.Generator) -> None:
    """put then get through KVManager with the engine's KV memory on the GPU, layer-wise, both paths."""
    L, B, T, H, D = 4, 64, 16, 2, 64
    kv = make_kv(register=False, num_layers=L, num_kv_heads=H, head_size=D, dtype="bfloat16", tokens_per_block=T,
                 num_cpu_blocks=128, use_ce_transfer_h2d=ce, use_ce_transfer_d2h=ce, transfer_sms_h2d=4,
                 transfer_sms_d2h=4).kv
    kv_layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, L, B, T, H, D)
    caches = [torch.empty(kv_layout.kv_shape[1:], dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    for t in caches:
        random_bytes_(t, gen)
    tokens = rng.integers(0, 30_000, size=10 * T + 3)
    src = rng.permutation(B)[:10]
    dst = rng.permutation(B)[:10]
    kv.register_kv_caches(caches, kv_layout)
    first = kv.engine_layout
    # Again: the new registration takes over (pinning the CPU tier for its copies); the old one is let go.
    kv.register_kv_caches(caches, kv_layout)
    assert kv.engine_layout is not first and kv.engine_layout.is_cuda
    del first
    want = [t[:, src].clone() for t in caches]
    tid, mask = kv.put_match(tokens)
    kv.launch(tid, (src[:, None] * T + np.arange(T)).ravel())
    assert kv.wait(tid)[tid].ok
    for t in caches:
        t.fill_(float("nan"))
    tid, mask = kv.get_match(tokens)
    assert mask[: 10 * T].all() and not mask[10 * T:].any()
    kv.launch(tid, (dst[:, None] * T + np.arange(T)).ravel(), layerwise_transfer=True)
    compute = torch.cuda.Stream()
    for layer in range(L):
        if layer % 2:
            assert kv.wait_layer(tid, layer, stream=compute)  # the engine's stream waits, not this thread
        else:
            assert kv.wait_layer(tid, layer)
        with torch.cuda.stream(compute):  # what an engine's attention would read, ordered after the load
            got = caches[layer][:, dst].clone()
        compute.synchronize()
        assert torch.equal(got.view(torch.uint8), want[layer].view(torch.uint8)), layer
    assert kv.wait(tid)[tid].ok
    assert kv.cache_stats()["cpu"]["num_locked"] == 0


def test_data_plane_of_another_process_moves_cuda_blocks(make_kv, gen: torch.Generator,
                                                        rng: np.random.Generator) -> None:
    """A worker-side DataPlane (as vLLM's worker uses) maps a KVManager's CPU tier (a memfd received through the
    tier's socket), pins it and copies CUDA KV blocks that the manager's tasks name (take_external /
    finish_external)."""
    from flexkv.core.data_plane import DataPlane

    L, B, T, H, D = 2, 32, 16, 2, 64
    kv = make_kv(register=False, num_layers=L, num_kv_heads=H, head_size=D, dtype="bfloat16", tokens_per_block=T,
                 num_cpu_blocks=64).kv
    kv_layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, L, B, T, H, D)
    caches = [torch.empty(kv_layout.kv_shape[1:], dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    for t in caches:
        random_bytes_(t, gen)
    tokens = rng.integers(0, 30_000, size=6 * T)
    src, dst = [3, 9, 1, 30, 17, 22], [5, 6, 7, 8, 0, 31]
    plane = DataPlane(kv.tier_info(), EngineLayout.from_kv_layout(caches, kv_layout), kv.cache_config)
    assert isinstance(plane.copy, _core.GpuCopyEngine)
    want = [t[:, src].clone() for t in caches]
    task, _ = kv.put_match(tokens)
    seq, host = kv.take_external(task)
    job = plane.submit("engine_to_host", [src[i] for i in seq], host)
    assert plane.poll(30_000_000) == [(job, "")]
    kv.finish_external(task, True)
    for t in caches:
        t.fill_(float("nan"))
    task, _ = kv.get_match(tokens)
    seq, host = kv.take_external(task)
    job = plane.submit("host_to_engine", [dst[i] for i in seq], host, urgent=True)
    assert plane.poll(30_000_000) == [(job, "")]
    kv.finish_external(task, True)
    for t, w in zip(caches, want):
        assert torch.equal(t[:, dst].view(torch.uint8), w.view(torch.uint8))
    plane.close()
