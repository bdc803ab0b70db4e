"""Builds the C++ core's unit tests (with AddressSanitizer and UBSan) and runs them with ctest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpp_unit_tests_pass_under_sanitizers() -> None:
    cmake = shutil.which("cmake")
    assert cmake, "cmake is required to build the C++ tests (apt-get install cmake)"
    build = REPO / "build" / "ctest-sanitize"
    # The GPU code is tested on a GPU (tests/test_gpu_transfer.py); these tests build without it.
    subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-DFLEXKV_BUILD_PYTHON=OFF",
                    "-DFLEXKV_BUILD_TESTS=ON",
                    "-DFLEXKV_BUILD_EXAMPLES=ON", "-DFLEXKV_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug",
                    "-DFLEXKV_CUDA=OFF"],
                   check=True, capture_output=True, text=True)
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True, text=True)
    run = subprocess.run(["ctest", "--output-on-failure"], cwd=build, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100% tests passed" in run.stdout
    for name in ("block_key", "block_pool", "radix_index", "host_copy_engine", "copy_engine", "memfd_region", "io_env",
                 "ssd_store_io", "ssd_store_verify", "ssd_store_scan", "ssd_store_faults", "cache_options", "cache",
                 "control_stress",
                 "example_trtllm_pool"):
        assert f"{name} " in run.stdout, f"ctest did not run {name}"
    # The C++ API's example: a stored prefix is found and loaded byte-exact.
    config = REPO / "examples" / "cpp" / "flexkv_config.json"
    example = subprocess.run([str(build / "examples" / "cpp" / "trtllm_pool_example"), str(config)],
                             capture_output=True, text=True, timeout=60)
    assert example.returncode == 0, example.stdout + example.stderr
    assert "request B: FlexKV matched 32 of 100 prompt tokens" in example.stdout
    assert "identical to request A's blocks: yes" in example.stdout
