"""SGLang's token-indexed KV buffers behind FlexKV's KVManager, as ``--enable-flexkv`` registers them
(``KVTPClient.register_to_server``), without SGLang itself: on CPU tensors here and on CUDA tensors
(``-m gpu``, layer by layer) on the GPU machine. SGLang's own classes drive the same path in test_sglang.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexkv import KVCacheLayout, KVCacheLayoutType
from flexkv.adapters.sglang.flexkv_config import SglangModelConfig
from flexkv.adapters.sglang.tp_client import KVTPClient
from flexkv.core import LayoutError, ServerUnavailable

from kv_helpers import FakeEngine, slots

PAGE, LAYERS, HEADS, DIM, PAGES = 4, 3, 2, 8, 24


def model(mla: bool) -> SglangModelConfig:
    return SglangModelConfig(model_name="tiny", num_layers=LAYERS, num_kv_heads=1 if mla else HEADS,
                             head_size=24 if mla else DIM, use_mla=mla, dtype="bfloat16")


def round_trip(make_kv, device: str, mla: bool, layerwise: bool) -> None:
    """SGLang's pool (every layer's K buffer, then every layer's V buffer; MLA: one latent per layer), PAGES
    pages plus SGLang's padding page, registered as --enable-flexkv registers it; pages go out and back."""
    port = f"ipc:///tmp/flexkv-test-{device}-{int(mla)}-{int(layerwise)}_gpu_register"
    env = make_kv(model_config=model(mla), tokens_per_block=PAGE, num_cpu_blocks=64, gpu_register_port=port,
                  engine="sglang", engine_blocks=PAGES + 1, device=device, register=False)
    kv, eng = env.kv, env.eng
    before = eng.fill(range(PAGES + 1))
    layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, PAGES + 1, PAGE, eng.tensors[0].shape[1],
                           eng.tensors[0].shape[2], is_mla=mla)
    KVTPClient(port).register_to_server(kv_caches=eng.tensors, kv_layout=layout)
    assert kv.is_ready()
    tokens = np.arange(1000, 1000 + 5 * PAGE + 1, dtype=np.int64)
    src_pages = [7, 2, 19, 11, 4]
    tid, mask = kv.put_match(tokens)
    kv.launch([tid], [torch.from_numpy(slots(src_pages, PAGE))[: int(mask.sum())]], as_batch=False)
    assert kv.wait([tid])[tid].ok
    want = [eng.read(p) for p in src_pages]
    dst_pages = [0, 13, 22, 3, 9]
    eng.poison(dst_pages)
    tid, mask = kv.get_match(tokens)
    assert int(mask.sum()) == 5 * PAGE
    # as_batch with a layer-wise launch gives one batch handle (the original FlexKV's semantics); without, the task
    (tid,) = kv.launch([tid], [torch.from_numpy(slots(dst_pages, PAGE))], as_batch=True, layerwise_transfer=layerwise)
    if layerwise:
        stream = torch.cuda.current_stream()
        for layer in range(LAYERS):
            assert kv.wait_layer(tid, layer, stream)  # the engine's stream waits for this layer only
            stream.synchronize()
            for p, w in zip(dst_pages, want):  # a block's bytes are [layer][k|v][...]: this layer's part
                assert torch.equal(eng.read(p).view(LAYERS, -1)[layer], w.view(LAYERS, -1)[layer]), (p, layer)
    assert kv.wait([tid])[tid].ok
    eng.assert_blocks(dst_pages, want)
    others = sorted(set(range(PAGES + 1)) - set(dst_pages))
    eng.assert_blocks(others, [before[p] for p in others])  # no other page was written


@pytest.mark.parametrize("mla", [False, True])
def test_token_pool_round_trip_on_cpu(make_kv, mla: bool) -> None:
    round_trip(make_kv, "cpu", mla, layerwise=False)


@pytest.mark.gpu
@pytest.mark.parametrize("mla", [False, True])
def test_token_pool_round_trip_on_cuda_layer_by_layer(make_kv, mla: bool) -> None:
    round_trip(make_kv, "cuda", mla, layerwise=True)


def test_registration_errors_name_the_problem(make_kv, gen: torch.Generator) -> None:
    port = "ipc:///tmp/flexkv-test-errors_gpu_register"
    layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, PAGES + 1, PAGE, HEADS, DIM)
    caches = FakeEngine("sglang", num_layers=LAYERS, num_blocks=PAGES + 1, tokens_per_block=PAGE, num_kv_heads=HEADS,
                        head_size=DIM, dtype=torch.bfloat16, gen=gen).tensors
    with pytest.raises(ServerUnavailable, match="nothing listens at ipc:///tmp/flexkv-test-errors_gpu_register"):
        KVTPClient(port).register_to_server(kv_caches=caches, kv_layout=layout)
    settings = dict(model_config=model(False), tokens_per_block=PAGE, num_cpu_blocks=16, gpu_register_port=port,
                    register=False)
    kv = make_kv(**settings).kv
    with pytest.raises(LayoutError, match="K buffers, then V buffers"):
        KVTPClient(port).register_to_server(kv_caches=caches[:-1], kv_layout=layout)
    with pytest.raises(LayoutError, match="indexer"):
        KVTPClient(port).register_to_server(kv_caches=caches, kv_layout=layout, indexer_buffers=[caches[0]])
    assert not kv.is_ready()  # the refused registrations registered nothing
    with pytest.raises(RuntimeError, match="already used by another KVManager"):
        make_kv(**settings)
    assert model(False).fingerprint() != SglangModelConfig(model_name="other", num_layers=LAYERS, num_kv_heads=HEADS,
                                                           head_size=DIM, dtype="bfloat16").fingerprint()
