"""SGLang 0.5.23's ``--enable-flexkv --tp-size 2`` on SGLang's own classes, each rank in its own process
(tests/sglang_tp_rank.py): rank 0's connector runs FlexKV's KVManager, every rank registers its KV pool
through ``gpu_register_port`` and copies its own head slice. One pair of rank processes runs every check:
the synchronous round trip, MLA (rank 0 stores the latent, every rank loads it), the layer-wise one (each
rank's forward pass released by its own copies), and a rank SIGKILLed with a load in flight, which fails
that load within the rank lease instead of hanging it.
"""

from __future__ import annotations

import pytest

from kv_helpers import seed_for

CHECKS = [("mp_round_trip", 0), ("mp_round_trip", 1), ("mla_round_trip", 0), ("mla_round_trip", 1),
          ("layerwise_round_trip", 0), ("layerwise_round_trip", 1), ("killed_rank_fails_within_lease", 0)]


@pytest.fixture(scope="module")
def tp_ranks(run_ranks, tmp_path_factory: pytest.TempPathFactory) -> dict:
    import sglang  # noqa: F401  (a missing SGLang is an install error: ./build.sh --dev installs it)

    seed = seed_for("tests/test_sglang_tp.py")
    print(f"FLEXKV_TEST_SEED={seed} reproduces tests/test_sglang_tp.py (rank r's KV bytes: seed + r)")
    return run_ranks("sglang_tp_rank.py", tmp_path_factory.mktemp("sglang-tp"), seed)


@pytest.mark.parametrize(("check", "rank"), CHECKS, ids=[f"{c}-rank{r}" for c, r in CHECKS])
def test_sglang_tp2_rank_check(tp_ranks: dict, check: str, rank: int) -> None:
    line = tp_ranks["lines"].get((check, rank))
    assert line == f"PASS {check} rank{rank}", line or f"{check} did not run on rank {rank}:\n{tp_ranks['output']}"


def test_sglang_tp2_ranks_end_as_planned(tp_ranks: dict) -> None:
    """Rank 0 ends normally; rank 1 ends SIGKILLed by the kill check."""
    assert tp_ranks["codes"] == [0, -9], tp_ranks["output"]
