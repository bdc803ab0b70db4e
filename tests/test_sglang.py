"""FlexKV under SGLang 0.5.23's own classes (installed by ``./build.sh --dev``), on CPU tensors.

The scenarios (tests/sglang_scenarios.py) run in one subprocess, which keeps SGLang's process-wide
state away from the other tests; each becomes one test here:

- HiCache: SGLang's storage-backend factory loads ``flexkv.adapters.sglang.FlexKVHiCacheStorage``; the
  cache controller's own backup, hit query and prefetch move pages byte-exact for every host layout
  (MHA ``layer_first``, ``page_first``, ``page_first_direct``, ``page_head``; MLA ``layer_first``,
  ``page_first``, ``page_first_direct``), across a restart on the SSD tier, with the legacy flat-page
  calls, from several threads; ``batch_exists`` counts leading hits; TP sizes 1 and 2 never share.
- ``--enable-flexkv``: SGLang's ``FlexKVRadixCache`` and ``FlexKVConnector`` import this package's names
  and store and load a prefix byte-exact (MHA and MLA, and layer by layer through SGLang's eventfd
  handshake); unsupported settings are refused clearly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCENARIOS = [
    "hicache_every_layout_round_trip", "hicache_survives_a_restart_on_ssd", "hicache_exists_counts_leading_hits",
    "hicache_tp_ranks_never_share", "hicache_legacy_flat_pages", "hicache_concurrent_threads",
    "hicache_bad_input_is_refused", "radix_mha_round_trip", "radix_mla_round_trip", "radix_layerwise_round_trip",
    "radix_connector_imports_flexkv_names", "radix_pp2_is_refused_clearly",
]


@pytest.fixture(scope="module")
def scenario_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import sglang  # noqa: F401  (a missing SGLang is an install error: ./build.sh --dev installs it)

    work = tmp_path_factory.mktemp("sglang")
    run = subprocess.run([sys.executable, str(HERE / "sglang_scenarios.py"), str(work), *SCENARIOS],
                         capture_output=True, text=True, timeout=900, cwd=str(work))
    results, seeds = {}, {}
    for line in run.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL"):
            name = rest.split(":", 1)[0]
            results[name] = line
        elif status == "SEED":
            name, seed = rest.split()
            seeds[name] = seed
    results["__output__"] = run.stdout[-4000:] + run.stderr[-8000:]
    results["__seeds__"] = seeds
    return results


@pytest.mark.parametrize("name", SCENARIOS)
def test_sglang_scenario(scenario_results: dict, name: str) -> None:
    seed = scenario_results["__seeds__"].get(name)
    print(f"FLEXKV_TEST_SEED={seed} reproduces scenario {name}")
    line = scenario_results.get(name)
    assert line == f"PASS {name}", line or f"{name} did not run:\n{scenario_results['__output__']}"
