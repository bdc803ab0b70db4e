"""TensorRT-LLM with ``tensor_parallel_size=2`` in the conformance executor (tests/trtllm_executor.py), one
executor per rank process (tests/trtllm_tp_rank.py): one worker connector per rank, the scheduler connector
on rank 0, connector answers broadcast and ``get_finished`` all-gathered as TensorRT-LLM does. Every rank's
layers check their own head slice byte-exact before they run; every rank produces the same tokens."""

from __future__ import annotations

import pytest

from kv_helpers import seed_for

CHECKS = [("conversation_round_trip", 0), ("conversation_round_trip", 1), ("identical_outputs", 0),
          ("identical_outputs", 1)]


@pytest.fixture(scope="module")
def tp_ranks(run_ranks, tmp_path_factory: pytest.TempPathFactory) -> dict:
    seed = seed_for("tests/test_trtllm_tp.py")
    print(f"FLEXKV_TEST_SEED={seed} reproduces tests/test_trtllm_tp.py")
    return run_ranks("trtllm_tp_rank.py", tmp_path_factory.mktemp("trtllm-tp"), seed)


@pytest.mark.parametrize(("check", "rank"), CHECKS, ids=[f"{c}-rank{r}" for c, r in CHECKS])
def test_trtllm_tp2_rank_check(tp_ranks: dict, check: str, rank: int) -> None:
    line = tp_ranks["lines"].get((check, rank))
    assert line == f"PASS {check} rank{rank}", line or f"{check} did not run on rank {rank}:\n{tp_ranks['output']}"


def test_trtllm_tp2_ranks_exit_cleanly(tp_ranks: dict) -> None:
    assert tp_ranks["codes"] == [0, 0], tp_ranks["output"]


@pytest.mark.gpu
def test_trtllm_tp2_on_cuda_pools(run_ranks, tmp_path) -> None:
    """The same with both ranks' pools on the GPU: each rank's GPU data plane loads its slice layer by layer
    and its forward pass's stream waits for each layer."""
    seed = seed_for("tests/test_trtllm_tp.py::cuda")
    print(f"FLEXKV_TEST_SEED={seed} reproduces tests/test_trtllm_tp.py::test_trtllm_tp2_on_cuda_pools")
    ranks = run_ranks("trtllm_tp_rank.py", tmp_path, seed, env={"TP_TEST_DEVICE": "cuda"})
    for check, rank in CHECKS:
        assert ranks["lines"].get((check, rank)) == f"PASS {check} rank{rank}", ranks["output"]
    assert ranks["codes"] == [0, 0], ranks["output"]
