"""The C++ API is an installable CMake package: a C++ engine builds against the installed flexkv with
find_package(flexkv), and the installed headers are the public API alone.

The first tests use the flexkv installed in this environment (./build.sh, pip install .), as a user would;
the last one installs a plain CMake build of the source tree."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from flexkv.core import cpp_package

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cpp"
SOURCE_HEADERS = REPO / "csrc" / "include" / "flexkv"


def _cmake() -> str:
    cmake = shutil.which("cmake")
    assert cmake, "cmake is required to build against the C++ package (apt-get install cmake)"
    return cmake


def _installed_cmake_dir() -> Path:
    """The documented command, run where the docs run it: the repository root (whose flexkv/ is not the package)."""
    script = Path(sysconfig.get_path("scripts")) / "flexkv-cpp"
    assert script.is_file(), f"{script} is missing: install flexkv (./build.sh or pip install .)"
    run = subprocess.run([str(script), "--cmake-dir"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr  # nothing but the path: the command goes inside $(...)
    return Path(run.stdout.strip())


def _build_and_run_example(flexkv_dir: Path, build: Path) -> list[str]:
    """Configures examples/cpp as a standalone project against flexkv_dir, builds it, runs it; the compile lines."""
    cmake = _cmake()
    subprocess.run([cmake, "-S", str(EXAMPLE), "-B", str(build), f"-Dflexkv_DIR={flexkv_dir}",
                    "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], check=True, capture_output=True, text=True, timeout=300)
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([str(build / "trtllm_pool_example"), str(EXAMPLE / "flexkv_config.json")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    # What the example prints when request B gets request A's two whole blocks back, byte-exact.
    assert "request A finished: stored 4 blocks (64 tokens)" in run.stdout
    assert "request B: FlexKV matched 32 of 100 prompt tokens" in run.stdout
    assert "request B: loaded 32 tokens into 2 engine blocks; identical to request A's blocks: yes" in run.stdout
    return [line for line in (build / "compile_commands.json").read_text().splitlines() if '"command"' in line]


@pytest.fixture(scope="module")
def installed_examples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """examples/cpp built against the installed package, once: (build dir, its compile lines)."""
    build = tmp_path_factory.mktemp("example") / "build"
    return build, _build_and_run_example(_installed_cmake_dir(), build)


def test_example_builds_against_the_installed_package_and_runs(installed_examples: tuple[Path, list[str]]) -> None:
    cmake_dir = _installed_cmake_dir()
    prefix = cmake_dir.parents[2]
    assert (cmake_dir / "flexkvConfig.cmake").is_file()
    assert prefix == Path(importlib.metadata.distribution("flexkv").locate_file("flexkv")).resolve()
    _, commands = installed_examples
    # It compiled with the installed headers, never the source tree's public or internal ones.
    assert commands and all(f"{prefix}/include" in c and str(REPO / "csrc") not in c for c in commands), commands


def test_the_ssd_tier_of_the_installed_cpp_api(installed_examples: tuple[Path, list[str]], tmp_path: Path,
                                               seed: int) -> None:
    """Built with find_package(flexkv): blocks evicted from the CPU tier come back from SSD byte-exact, a
    block damaged on disk is a miss (only its verified prefix loads), and a fresh process finds the rest."""
    build, _ = installed_examples
    config = tmp_path / "flexkv.json"
    config.write_text((EXAMPLE / "ssd_warm_restart.json").read_text().replace("/tmp/flexkv_ssd_example",
                                                                              str(tmp_path / "ssd")))
    def run(phase: str) -> str:
        done = subprocess.run([str(build / "ssd_warm_restart"), str(config), phase, str(seed % 2**31)],
                              capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = run("store")
    assert "prompt 0: matched 96 tokens, load done (), 6 of 6 blocks exact" in out, out  # evicted, from SSD
    assert "ssd: 18 blocks written" in out, out
    # Damage block 3 of prompt 1 on disk: find its payload by its first bytes, flip one byte in it.
    head = bytes.fromhex(re.search(r"head 1\.3 ([0-9a-f]+)", out).group(1))
    files = [p for p in (tmp_path / "ssd").rglob("*") if p.is_file() and not p.name.startswith(".")]
    hits = [(f, f.read_bytes().find(head)) for f in files]
    (path, at), = [(f, i) for f, i in hits if i >= 0]
    with open(path, "r+b") as f:
        f.seek(at + 100)
        byte = f.read(1)[0]
        f.seek(at + 100)
        f.write(bytes([byte ^ 0xFF]))
    out = run("check")
    assert "restored 18 blocks from SSD" in out, out
    assert "prompt 0: matched 96 tokens, load done (), 6 of 6 blocks exact, matched after 96" in out, out
    assert "prompt 2: matched 96 tokens, load done (), 6 of 6 blocks exact, matched after 96" in out, out
    # The damaged block ends the load with its verified prefix and is a miss from then on.
    assert re.search(r"prompt 1: matched 96 tokens, load failed \(.*?did not arrive\), 3 of 6 blocks exact, "
                     r"matched after 48", out), out
    assert "1 did not verify" in out, out


def test_installed_headers_are_the_public_api_and_each_compiles_alone(tmp_path: Path) -> None:
    include = Path(cpp_package.cmake_prefix()) / "include"
    installed = sorted(p.name for p in (include / "flexkv").iterdir())
    # Every header of csrc/include/flexkv/ and nothing else; a stale install fails here, not later.
    assert installed == sorted(p.name for p in SOURCE_HEADERS.glob("*.h")), "reinstall: pip install ."
    assert list(include.iterdir()) == [include / "flexkv"]
    for name in installed:
        assert (include / "flexkv" / name).read_bytes() == (SOURCE_HEADERS / name).read_bytes(), \
            f"the installed {name} is not this source tree's: reinstall (pip install .)"
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "a C++ compiler is required (apt-get install g++)"
    for name in installed:
        # Only the installed include dir: a public header that includes an internal one ("index/...") fails.
        # -Werror: engines build with it, and -isystem does not hide every warning from every compiler.
        run = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only",
                              f"-I{include}", "-x", "c++", "-"], input=f"#include <flexkv/{name}>\n",
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 0, f"flexkv/{name} does not compile on its own:\n{run.stderr}"


def test_installed_package_config_exposes_only_the_install_tree() -> None:
    cmake_dir = Path(cpp_package.cmake_dir())
    assert sorted(p.name for p in cmake_dir.iterdir()) == [
        "flexkvConfig.cmake", "flexkvConfigVersion.cmake", "flexkvTargets-release.cmake", "flexkvTargets.cmake"]
    targets = (cmake_dir / "flexkvTargets.cmake").read_text()
    assert 'add_library(flexkv::flexkv STATIC IMPORTED)' in targets
    assert 'INTERFACE_INCLUDE_DIRECTORIES "${_IMPORT_PREFIX}/include"' in targets
    # The static library's link dependencies are the ones flexkvConfig.cmake re-finds; no path of this machine.
    links = re.search(r'INTERFACE_LINK_LIBRARIES "([^"]*)"', targets).group(1).split(";")
    assert set(links) <= {"Threads::Threads", "rt", r"\$<LINK_ONLY:flexkv::liburing>", "CUDA::cudart_static"}, links
    for f in cmake_dir.iterdir():
        assert str(REPO) not in f.read_text(), f"{f.name} names the source tree"
    version = re.search(r'set\(PACKAGE_VERSION "([^"]+)"\)', (cmake_dir / "flexkvConfigVersion.cmake").read_text())
    assert version.group(1) == importlib.metadata.version("flexkv")
    # scikit-build-core builds of other projects find the package through this entry point.
    roots = importlib.metadata.entry_points(group="cmake.root")
    assert [(e.name, e.value) for e in roots if e.name == "flexkv"] == [("flexkv", "flexkv")]


def test_cmake_dir_says_how_to_get_the_package_when_it_is_missing(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A flexkv without the C++ package beside it (run from a source tree, or an install without it): the
    module as it lies in such a tree, loaded from there, and its command run from there."""
    module_file = tmp_path / "core" / "cpp_package.py"
    module_file.parent.mkdir()
    shutil.copy(cpp_package.__file__, module_file)
    spec = importlib.util.spec_from_file_location("cpp_package_without_the_package", module_file)
    bare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bare)
    with pytest.raises(FileNotFoundError, match=rf"not installed in {re.escape(str(tmp_path))} .*pip install \."):
        bare.cmake_dir()
    assert bare.main(["--prefix"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "error: FlexKV's C++ package is not installed" in out.err
    run = subprocess.run([sys.executable, str(module_file), "--cmake-dir"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1 and run.stdout == "", run
    assert "error: FlexKV's C++ package is not installed" in run.stderr


@pytest.mark.slow
def test_source_build_installs_a_relocatable_package(tmp_path: Path) -> None:
    cmake = _cmake()
    build = REPO / "build" / "cpp-install"
    subprocess.run([cmake, "-S", str(REPO), "-B", str(build), "-DFLEXKV_BUILD_PYTHON=OFF", "-DFLEXKV_CUDA=OFF"],
                   check=True, capture_output=True, text=True, timeout=300)
    subprocess.run([cmake, "--build", str(build), "-j2"], check=True, capture_output=True, text=True, timeout=600)
    subprocess.run([cmake, "--install", str(build), "--prefix", str(tmp_path / "prefix")], check=True,
                   capture_output=True, text=True, timeout=120)
    installed = sorted(str(p.relative_to(tmp_path / "prefix")) for p in (tmp_path / "prefix").rglob("*")
                       if p.is_file())
    assert installed == sorted(
        [f"include/flexkv/{p.name}" for p in SOURCE_HEADERS.glob("*.h")]
        + ["lib/libflexkv.a"]
        + [f"lib/cmake/flexkv/{n}" for n in ("flexkvConfig.cmake", "flexkvConfigVersion.cmake",
                                             "flexkvTargets-release.cmake", "flexkvTargets.cmake")])
    # The package holds no absolute path of its own: moved elsewhere, it still works.
    moved = tmp_path / "elsewhere"
    (tmp_path / "prefix").rename(moved)
    commands = _build_and_run_example(moved / "lib" / "cmake" / "flexkv", tmp_path / "example")
    assert commands and all(f"{moved}/include" in c for c in commands), commands
