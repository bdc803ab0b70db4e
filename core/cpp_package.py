"""Where the installed wheel keeps FlexKV's C++ API, for C++ engines that build against it with CMake.

The wheel installs the C++ package inside the ``flexkv`` Python package: ``include/flexkv/`` (the public
headers), ``lib/libflexkv.a`` and ``lib/cmake/flexkv/`` (``flexkvConfig.cmake``: ``find_package(flexkv)``
defines ``flexkv::flexkv``). Point CMake at it with the ``flexkv-cpp`` script (``main`` below)::

    cmake -S my_engine -B build -Dflexkv_DIR="$(flexkv-cpp --cmake-dir)"

``flexkv-cpp --prefix`` prints the install prefix instead (for ``CMAKE_PREFIX_PATH``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The wheel maps core/ to flexkv/core/ and installs CMake's output into flexkv/ (pyproject.toml).
_PREFIX = Path(__file__).resolve().parent.parent
_CONFIG = Path("lib") / "cmake" / "flexkv" / "flexkvConfig.cmake"


def cmake_prefix() -> str:
    """The install prefix of the C++ package (it holds include/ and lib/).

    Raises FileNotFoundError when this flexkv has no C++ package beside it (run from a source tree).
    """
    if not (_PREFIX / _CONFIG).is_file():
        raise FileNotFoundError(
            f"FlexKV's C++ package is not installed in {_PREFIX} (no {_CONFIG} there): this flexkv runs from "
            "a source tree or an install without it; install the wheel (./build.sh or pip install .), or build "
            "it from source with cmake --install (README.md, C++ API)")
    return str(_PREFIX)


def cmake_dir() -> str:
    """The folder of flexkvConfig.cmake: pass it to CMake as ``-Dflexkv_DIR=...``."""
    return str(Path(cmake_prefix()) / _CONFIG.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flexkv-cpp",
        description="Print where the installed FlexKV C++ package is, for CMake's find_package(flexkv).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--cmake-dir", action="store_true", help="the folder of flexkvConfig.cmake (flexkv_DIR)")
    which.add_argument("--prefix", action="store_true", help="the install prefix (CMAKE_PREFIX_PATH)")
    args = parser.parse_args(argv)
    try:
        print(cmake_dir() if args.cmake_dir else cmake_prefix())
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
