"""The wheel builds and every public module imports from a clean virtual environment, without torch."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PUBLIC_MODULES = [
    "flexkv", "flexkv.kvmanager", "flexkv.config", "flexkv.common.config", "flexkv.common.storage",
    "flexkv.common.request", "flexkv.adapters", "flexkv.core.kv_manager", "flexkv.core.config",
    "flexkv.core.config_file", "flexkv.core.config_keys", "flexkv.core.resources",
    "flexkv.core.layout", "flexkv.core.cli", "flexkv.core.bench", "flexkv._core", "flexkv.core.data_plane",
    "flexkv.core.gpu_plane", "flexkv.core.cpp_package", "flexkv.adapters.vllm",
    "flexkv.integration.vllm.vllm_v1_adapter",
    "flexkv.adapters.trtllm", "flexkv.integration.tensorrt_llm.trtllm_adapter", "flexkv.adapters.sglang",
    "flexkv.integration.config", "flexkv.server.client", "flexkv.transfer.layerwise", "flexkv.transfer_manager",
]

SMOKE = """
import importlib, numpy as np
for m in {modules!r}:
    importlib.import_module(m)
import flexkv
assert "torch" not in __import__("sys").modules, "importing flexkv pulled in torch"
kv = flexkv.KVManager(flexkv.ModelConfig(num_layers=1, num_kv_heads=1, head_size=8, dtype="float32"),
                      flexkv.CacheConfig(num_cpu_blocks=8, tokens_per_block=4))
kv.start()
engine = np.random.default_rng(0).random((4, 2, 4, 1, 8), dtype=np.float32)  # [blocks, k|v, tpb, heads, dim]
kv.register_kv_caches(engine, flexkv.KVCacheLayout("LAYERBLOCK", 1, 4, 4, 1, 8))
want = engine.copy()
tokens = np.arange(8)
t, mask = kv.put_match(tokens); kv.launch(t, np.flatnonzero(mask)); assert kv.wait(t)[t].ok
engine[:] = np.nan
t, mask = kv.get_match(tokens); kv.launch(t, np.flatnonzero(mask) + 8); assert kv.wait(t)[t].ok
assert np.array_equal(engine[2:4], want[0:2])
kv.shutdown()
print("clean-venv-ok")
"""


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_clean_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=900)
    wheels = list(dist.glob("flexkv-*.whl"))
    assert len(wheels) == 1, wheels
    # CMake's install step lands in the flexkv package: the Python module and the C++ API's CMake package,
    # whose headers are csrc/include/flexkv/'s and no internal one.
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert [n for n in names if n.startswith("flexkv/_core") and n.endswith(".so")], names
    headers = sorted(n for n in names if n.startswith("flexkv/include/"))
    assert headers == sorted(f"flexkv/include/flexkv/{p.name}" for p in (REPO / "csrc/include/flexkv").glob("*.h"))
    for name in ("lib/libflexkv.a", "lib/cmake/flexkv/flexkvConfig.cmake", "lib/cmake/flexkv/flexkvConfigVersion.cmake",
                 "lib/cmake/flexkv/flexkvTargets.cmake"):
        assert f"flexkv/{name}" in names, name
    # The config key table ships next to the module that reads it (the C++ library has its own copy compiled in).
    assert "flexkv/core/config_keys.json" in names
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheels[0])], check=True, capture_output=True,
                   text=True, timeout=900)
    run = subprocess.run([str(py), "-c", SMOKE.format(modules=PUBLIC_MODULES)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "clean-venv-ok" in run.stdout
    help_text = subprocess.run([str(env_dir / "bin" / "flexkv"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "bench" in help_text
    cmake_dir = subprocess.run([str(env_dir / "bin" / "flexkv-cpp"), "--cmake-dir"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert (Path(cmake_dir) / "flexkvConfig.cmake").is_file() and cmake_dir.startswith(str(env_dir)), cmake_dir
