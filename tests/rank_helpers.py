"""Tensor-parallel ranks in their own processes for the rank tests.

A rank's KV memory is a file-backed shared mapping (``torch.from_file(shared=True)``) in vLLM's per-layer
layout, holding only that rank's heads; the test process maps the same file, so it fills and checks every
rank's bytes while the rank process copies them with its own data plane (``RankAgent``). Run as a script,
this module is the rank process: it registers, prints READY and serves orders until its stdin closes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from kv_helpers import DEFAULT_MODEL

NUM_BLOCKS = 32
HEADS_PER_RANK = 1
HEAD = DEFAULT_MODEL["head_size"]
LAYERS = DEFAULT_MODEL["num_layers"]


def rank_tensors(path: Path, tpb: int) -> list[torch.Tensor]:
    """Per layer [k|v, blocks, tokens, heads of this rank, head], float16, over the shared file."""
    per_layer = 2 * NUM_BLOCKS * tpb * HEADS_PER_RANK * HEAD
    flat = torch.from_file(str(path), shared=True, size=LAYERS * per_layer, dtype=torch.float16)
    return [flat[i * per_layer:(i + 1) * per_layer].view(2, NUM_BLOCKS, tpb, HEADS_PER_RANK, HEAD)
            for i in range(LAYERS)]


def rank_block(tensors: list[torch.Tensor], b: int) -> torch.Tensor:
    """Block b of a rank as bytes, layer by layer, K then V."""
    return torch.cat([t[kv, b].reshape(-1).view(torch.uint8) for t in tensors for kv in range(2)])


def make_file(path: Path, tpb: int) -> None:
    path.write_bytes(b"\0" * (LAYERS * 2 * NUM_BLOCKS * tpb * HEADS_PER_RANK * HEAD * 2))


def spawn_rank(endpoint: str, rank: int, tp: int, path: Path, tpb: int, cwd: Path,
               instance: int = 0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, __file__, endpoint, str(rank), str(tp), str(path), str(tpb),
                             str(instance)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
    line = proc.stdout.readline()
    assert line.strip() == "READY", f"rank {rank} did not start: {line!r}"
    return proc


def _serve(endpoint: str, rank: int, tp: int, path: str, tpb: int, instance: int) -> None:
    from flexkv.core import EngineLayout, KVCacheLayout, KVCacheLayoutType
    from flexkv.core.rank_agent import RankAgent

    tensors = rank_tensors(Path(path), tpb)
    kv_layout = KVCacheLayout(KVCacheLayoutType.LAYERFIRST, LAYERS, NUM_BLOCKS, tpb, HEADS_PER_RANK, HEAD)

    def layout(model: dict) -> EngineLayout:
        assert model["tp_size"] == tp, model
        return EngineLayout.from_kv_layout(tensors, kv_layout, tp_size=tp, tp_rank=rank)

    agent = RankAgent(endpoint, layout, instance=instance)
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    agent.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    a = sys.argv[1:]
    _serve(a[0], int(a[1]), int(a[2]), a[3], int(a[4]), int(a[5]))
