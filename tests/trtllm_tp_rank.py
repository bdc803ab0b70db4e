"""One rank of a TensorRT-LLM executor with ``tensor_parallel_size=2`` and FlexKV's connector, in the
conformance executor (tests/trtllm_executor.py). Run by tests/test_trtllm_tp.py, one process per rank:

    python tests/trtllm_tp_rank.py <workdir> <rank> <seed>

As in TensorRT-LLM, every rank builds FlexKV's worker connector from the same ``llm_args`` (its rank from the
MPI launcher's ``OMPI_COMM_WORLD_RANK``), rank 0 also the scheduler connector; the executor broadcasts rank
0's connector answers and all-gathers ``get_finished`` over a gloo group. Each rank's pool holds its own
head slice; every layer checks, before it runs, that the prompt's earlier positions hold that rank's bytes,
so a load that leaves any of them poisoned or wrong fails. Prints ``PASS <check> rank<r>`` or ``FAIL ...``:

- ``conversation_round_trip``: turn 1 is computed and stored; the engine's own blocks are dropped and
  poisoned; turns 2 and 3 (two requests at once) load their prefixes from FlexKV byte-exact on every rank.
- ``identical_outputs``: every rank produced the same tokens for every request, and rank 0's FlexKV counted
  the hits and stores the turns imply, with no failure on any rank.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

HERE = Path(__file__).resolve().parent
WORK, RANK, SEED = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
TP, TPB, LAYERS, HEADS_X_DIM = 2, 4, 3, 8  # HEADS_X_DIM: one rank's heads times head size
DEVICE = os.environ.get("TP_TEST_DEVICE", "cpu")  # "cuda": every rank's pool on the GPU (tests marked gpu)


class GlooComm:
    """TensorRT-LLM's mpi_broadcast (from rank 0) and mpi_allgather, over the ranks' gloo group. The broadcast
    returns on rank 0 only once every rank has entered it (an all-gather), so what a rank did before it (the
    executor poisons new blocks) happens before rank 0 goes on to launch copies into them."""

    rank, size = RANK, TP

    def broadcast(self, obj):
        return self.allgather(obj)[0]

    def allgather(self, obj):
        out = [None] * TP
        dist.all_gather_object(out, obj)
        return out


def main() -> int:
    sys.path.insert(0, str(HERE))
    from trtllm_executor import MiniExecutor, Request

    from flexkv.adapters.trtllm import FlexKVSchedulerConnector, FlexKVWorkerConnector
    from flexkv.adapters.trtllm.session import drop_session

    config = WORK / "flexkv.json"
    if RANK == 0:
        config.write_text(json.dumps({"server_recv_port": f"ipc://{WORK}/flexkv", "server_lease_seconds": 2.0,
                                      "cache_config": {"tokens_per_block": TPB, "num_cpu_blocks": 256}}))
    dist.init_process_group("gloo", init_method=f"file://{WORK}/gloo-init", rank=RANK, world_size=TP)
    dist.barrier()  # the config is written
    os.environ["FLEXKV_CONFIG_PATH"] = str(config)
    args = SimpleNamespace(model="tiny-trtllm-tp", tensor_parallel_size=TP, pipeline_parallel_size=1,
                           max_beam_width=1, kv_cache_config=SimpleNamespace(tokens_per_block=TPB,
                                                                             enable_block_reuse=True,
                                                                             enable_partial_reuse=False,
                                                                             host_cache_size=None))
    worker = FlexKVWorkerConnector(args)
    scheduler = FlexKVSchedulerConnector(args) if RANK == 0 else None
    comm = GlooComm()
    print(f"SEED rank{RANK} {SEED} device {DEVICE}", flush=True)
    failed = 0
    try:
        ex = MiniExecutor(scheduler, worker, num_blocks=96, num_layers=LAYERS, tokens_per_block=TPB,
                          heads_x_dim=HEADS_X_DIM, comm=comm, device=DEVICE)
        rng = random.Random(SEED)  # the same prompts on every rank, as TensorRT-LLM's ranks see one request

        def prompt(n: int) -> list[int]:
            return [rng.randrange(5, 30000) for _ in range(n)]

        requests: list[Request] = []
        try:
            first = Request(1, prompt(37), max_new_tokens=3)
            ex.add_request(first)
            ex.run()
            ex.evict_device_cache()  # memory pressure: the next turns load from FlexKV into poisoned blocks
            second = Request(2, first.tokens + prompt(11), max_new_tokens=2)
            other = Request(3, first.tokens[: 3 * TPB] + prompt(9), max_new_tokens=2)
            ex.add_request(second)
            ex.add_request(other)
            ex.run()
            requests = [first, second, other]
            checked = ex.layer_checks
            assert checked > 0 and worker.load_failures == 0, (checked, worker.load_failures)
            print(f"PASS conversation_round_trip rank{RANK}", flush=True)
        except Exception as e:  # this check's FAIL line; the ranks stay in step for the next check
            failed += 1
            traceback.print_exc()
            print(f"FAIL conversation_round_trip rank{RANK}: {e!r} (FLEXKV_TEST_SEED={SEED})", flush=True)
        outputs = comm.allgather([r.tokens for r in requests])
        try:
            assert requests and all(o == outputs[0] for o in outputs), "the ranks' outputs differ"
            if RANK == 0:
                stats = scheduler.stats()
                stored = (37 + 3 - 1) // TPB * TPB
                assert stats["hit_tokens"] == stored + 3 * TPB, stats  # turn 2 loads all of turn 1, turn 3 part
                assert stats["failures"] == 0 and stats["stored_tokens"] >= stored, stats
            assert not ex.pinned and not ex.loading, "a transfer was never reported by every rank"
            print(f"PASS identical_outputs rank{RANK}", flush=True)
        except Exception as e:
            failed += 1
            traceback.print_exc()
            print(f"FAIL identical_outputs rank{RANK}: {e!r} (FLEXKV_TEST_SEED={SEED})", flush=True)
    finally:
        dist.barrier()  # every rank's copies are done before rank 0 stops the cache
        if RANK > 0:
            drop_session(args)
        dist.barrier()
        if RANK == 0:
            drop_session(args)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
