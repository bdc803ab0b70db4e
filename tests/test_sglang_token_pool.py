"""SGLang's token-indexed KV buffers behind FlexKV's KVManager, as ``--enable-flexkv`` registers them
(``KVTPClient.register_to_server``), without SGLang itself: on CPU tensors here and on CUDA tensors
(``-m gpu``, layer by layer) on the GPU machine. SGLang's own classes drive the same path in test_sglang.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv import CacheConfig, KVCacheLayout, KVCacheLayoutType, KVManager
from flexkv.adapters.sglang.flexkv_config import SglangModelConfig
from flexkv.adapters.sglang.tp_client import KVTPClient
from flexkv.core.errors import LayoutError

PAGE, LAYERS, HEADS, DIM, PAGES = 4, 3, 2, 8, 24


def buffers(device: str, mla: bool, gen: torch.Generator) -> list[torch.Tensor]:
    """SGLang's MHA pool: every layer's K buffer, then every layer's V buffer; MLA: one latent per layer.
    Each holds PAGES pages plus SGLang's padding page."""
    shape = (PAGES * PAGE + PAGE, 1 if mla else HEADS, 24 if mla else DIM)
    count = LAYERS if mla else 2 * LAYERS
    return [torch.randn(shape, generator=gen).to(torch.bfloat16).to(device) for _ in range(count)]


def round_trip(device: str, mla: bool, layerwise: bool) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,)).item()))
    model = SglangModelConfig(model_name="tiny", num_layers=LAYERS, num_kv_heads=1 if mla else HEADS,
                              head_size=24 if mla else DIM, use_mla=mla, dtype="bfloat16")
    port = f"ipc:///tmp/flexkv-test-{device}-{int(mla)}-{int(layerwise)}_gpu_register"
    kv = KVManager(model, CacheConfig(tokens_per_block=PAGE, num_cpu_blocks=64), gpu_register_port=port)
    kv.start()
    try:
        caches = buffers(device, mla, gen)
        layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, PAGES + 1, PAGE, caches[0].shape[1],
                               caches[0].shape[2], is_mla=mla)
        KVTPClient(port).register_to_server(kv_caches=caches, kv_layout=layout)
        assert kv.is_ready()
        tokens = np.arange(1000, 1000 + 5 * PAGE + 1, dtype=np.int64)
        src_pages = [7, 2, 19, 11, 4]
        src_slots = torch.tensor([p * PAGE + o for p in src_pages for o in range(PAGE)], dtype=torch.int64)
        tid, mask = kv.put_match(tokens)
        kv.launch([tid], [src_slots[: int(mask.sum())]], as_batch=False)
        assert kv.wait([tid])[tid].ok
        want = [c[src_slots].clone() for c in caches]
        dst_pages = [0, 13, 22, 3, 9]
        dst_slots = torch.tensor([p * PAGE + o for p in dst_pages for o in range(PAGE)], dtype=torch.int64)
        for c in caches:
            c[dst_slots] = float("nan")
        tid, mask = kv.get_match(tokens)
        assert int(mask.sum()) == 5 * PAGE
        kv.launch([tid], [dst_slots], as_batch=True, layerwise_transfer=layerwise)
        if layerwise:
            stream = torch.cuda.current_stream()
            for layer in range(LAYERS):
                assert kv.wait_layer(tid, layer, stream)  # the engine's stream waits for this layer only
                per_layer = [layer] if mla else [layer, LAYERS + layer]
                for i in per_layer:
                    assert torch.equal(caches[i][dst_slots].view(torch.int16), want[i].view(torch.int16))
        assert kv.wait([tid])[tid].ok
        for c, w in zip(caches, want):
            assert torch.equal(c[dst_slots].view(torch.int16), w.view(torch.int16))
    finally:
        kv.shutdown()


@pytest.mark.parametrize("mla", [False, True])
def test_token_pool_round_trip_on_cpu(mla: bool) -> None:
    round_trip("cpu", mla, layerwise=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mla", [False, True])
def test_token_pool_round_trip_on_cuda_layer_by_layer(mla: bool) -> None:
    round_trip("cuda", mla, layerwise=True)


def test_registration_errors_name_the_problem() -> None:
    model = SglangModelConfig(model_name="tiny", num_layers=LAYERS, num_kv_heads=HEADS, head_size=DIM,
                              dtype="bfloat16")
    port = "ipc:///tmp/flexkv-test-errors_gpu_register"
    layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, PAGES + 1, PAGE, HEADS, DIM)
    caches = buffers("cpu", False, torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="no FlexKV KVManager listens"):
        KVTPClient(port).register_to_server(kv_caches=caches, kv_layout=layout)
    kv = KVManager(model, CacheConfig(tokens_per_block=PAGE, num_cpu_blocks=16), gpu_register_port=port)
    kv.start()
    try:
        with pytest.raises(LayoutError, match="K buffers, then V buffers"):
            KVTPClient(port).register_to_server(kv_caches=caches[:-1], kv_layout=layout)
        with pytest.raises(LayoutError, match="indexer"):
            KVTPClient(port).register_to_server(kv_caches=caches, kv_layout=layout, indexer_buffers=[caches[0]])
        with pytest.raises(RuntimeError, match="already used by another KVManager"):
            KVManager(model, CacheConfig(tokens_per_block=PAGE, num_cpu_blocks=16), gpu_register_port=port).start()
    finally:
        kv.shutdown()
    assert model.fingerprint() != SglangModelConfig(model_name="other", num_layers=LAYERS, num_kv_heads=HEADS,
                                                    head_size=DIM, dtype="bfloat16").fingerprint()
