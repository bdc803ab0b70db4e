"""Layer-wise vs asynchronous (whole) loads on the GPU: the time from a hit's load to the end of the forward that
uses it, as ratios to the forward alone, measured in the same run.

This is the trade-off of the vLLM connector's ``flexkv_load_mode``. The rig is what vLLM's worker does, with the
same FlexKV parts: vLLM's per-layer KV tensors (``[2, num_blocks, tokens_per_block, 8 heads, 128]`` bf16 per
layer) registered through the connector's own ``layout_from_kv_caches``, a pinned host region as the CPU tier,
the GPU data plane that ``make_gpu_copy_engine`` builds with the default config, and a stand-in forward: per layer,
two matmuls of a Qwen-32B-sized MLP (hidden 5120, intermediate 27648) over the step's new tokens. Rows:

  forward       the forward alone (the ceiling: no load in the way)
  load          the load alone (hit blocks host to GPU, urgent)
  async         the load, then the forward: what the asynchronous mode costs the request (it also waits for
                the load's report, about one engine step, which is not counted here)
  layerwise     ``start_load_kv`` submits the load layer-wise, then each layer's compute waits on its layer's
                CUDA event (``wait_for_layer_load``) before running: what the step costs in layer-wise mode

``new`` tokens stand for the step's batch: a few thousand for the rest of a long prompt, 64 for a step that is
mostly other requests' decodes (where a layer-wise load lengthens their step; an asynchronous load does not).
Needs a CUDA build of FlexKV and an NVIDIA GPU.

    python benchmarks/gpu_layerwise.py [--hit-tokens 8192] [--new-tokens 64,512,2048,8192] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import mmap
import time
from types import SimpleNamespace

import numpy as np
import torch

from flexkv.adapters.vllm.kv_layout import layout_from_kv_caches
from flexkv.core.config import CacheConfig
from flexkv.core.gpu_plane import make_gpu_copy_engine

HEADS, HEAD = 8, 128


class Rig:
    def __init__(self, layers: int, hit_blocks: int, tokens_per_block: int, hidden: int, ffn: int) -> None:
        self.num_blocks = hit_blocks
        self.kv = {f"model.layers.{i}.self_attn.attn": torch.zeros(2, hit_blocks, tokens_per_block, HEADS, HEAD,
                                                                    dtype=torch.bfloat16, device="cuda")
                   for i in range(layers)}
        self.layout, _, _ = layout_from_kv_caches(self.kv, hit_blocks)
        block_bytes = self.layout.block_bytes
        self.host_map = mmap.mmap(-1, hit_blocks * block_bytes)
        host = np.frombuffer(self.host_map, dtype=np.uint8)
        host[:] = np.random.default_rng(0).integers(0, 256, size=host.size, dtype=np.uint8)
        self.tier = SimpleNamespace(base=host.ctypes.data, num_blocks=hit_blocks, block_stride=block_bytes)
        self.engine, self.layout_id = make_gpu_copy_engine(CacheConfig(), self.layout, self.tier)
        self.groups = np.unique(self.layout.grouped_segments()[:, 4])
        self.ids = np.random.default_rng(1).permutation(hit_blocks).astype(np.int64)
        self.w_up = torch.randn(hidden, ffn, dtype=torch.bfloat16, device="cuda") * 0.01
        self.w_down = torch.randn(ffn, hidden, dtype=torch.bfloat16, device="cuda") * 0.01
        self.hidden = hidden
        self.layers = layers

    def submit(self, layerwise: bool) -> int:
        return int(self.engine.submit("host_to_engine", self.layout_id, self.ids, self.ids, True, layerwise))

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w_up).relu_() @ self.w_down

    def forward(self, x: torch.Tensor, layer_job: int | None = None) -> torch.Tensor:
        stream = torch.cuda.current_stream().cuda_stream
        for i in range(self.layers):
            if layer_job is not None:
                self.engine.stream_wait_group(layer_job, int(self.groups[i]), stream)
            x = self.layer(x)
        return x

    def drain(self) -> None:
        while self.engine.next_completion(0) is not None:
            pass


def timed(run, repeat: int) -> float:
    """Milliseconds of run(), synchronized before and after: the median of `repeat` runs after one warm-up."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def measure(rig: Rig, new_tokens: int, repeat: int) -> dict:
    x = torch.randn(new_tokens, rig.hidden, dtype=torch.bfloat16, device="cuda")

    def load() -> None:
        rig.engine.wait(rig.submit(False), -1)

    def whole() -> None:
        load()
        rig.forward(x)

    def layerwise() -> None:
        job = rig.submit(True)
        rig.forward(x, job)
        torch.cuda.synchronize()
        rig.engine.wait(job, -1)

    row = {"new_tokens": new_tokens, "forward_ms": timed(lambda: rig.forward(x), repeat),
           "load_ms": timed(load, repeat), "async_ms": timed(whole, repeat),
           "layerwise_ms": timed(layerwise, repeat)}
    rig.drain()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hit-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", default="64,512,2048,8192")
    p.add_argument("--tokens-per-block", type=int, default=16)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=27648)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="")
    a = p.parse_args()
    rig = Rig(a.layers, a.hit_tokens // a.tokens_per_block, a.tokens_per_block, a.hidden, a.ffn)
    mib = rig.num_blocks * rig.layout.block_bytes / 2**20
    print(f"{torch.cuda.get_device_name()}: a hit of {a.hit_tokens} tokens ({rig.num_blocks} blocks, {mib:.0f} MiB) "
          f"in {a.layers} layers; forward: {a.layers} x MLP {a.hidden}x{a.ffn} bf16; median of {a.repeat}")
    print(f"{'new tokens':>10} {'forward':>9} {'load':>9} {'async':>9} {'layerwise':>9} "
          f"{'async/fwd':>9} {'lw/fwd':>7} {'async/lw':>8} {'hidden':>7}")
    rows = []
    for n in (int(s) for s in a.new_tokens.split(",")):
        r = measure(rig, n, a.repeat)
        # The share of the load that layer-wise mode hides behind the forward.
        r["hidden_share"] = (r["async_ms"] - r["layerwise_ms"]) / r["load_ms"]
        rows.append(r)
        print(f"{n:>10} {r['forward_ms']:>7.2f}ms {r['load_ms']:>7.2f}ms {r['async_ms']:>7.2f}ms "
              f"{r['layerwise_ms']:>7.2f}ms {r['async_ms'] / r['forward_ms']:>9.2f} "
              f"{r['layerwise_ms'] / r['forward_ms']:>7.2f} {r['async_ms'] / r['layerwise_ms']:>8.2f} "
              f"{r['hidden_share']:>7.0%}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(a), "rows": rows}, f, indent=1)
    rig.engine.close()


if __name__ == "__main__":
    main()
