#!/usr/bin/env bash
# Builds and installs FlexKV into the current Python environment.
#   ./build.sh          system packages (Debian/Ubuntu, as root) + pip install .
#   ./build.sh --dev    the same, plus test dependencies (pytest, ruff, CPU torch, matplotlib)
set -euo pipefail
cd "$(dirname "$0")"

if ! [ -f /usr/include/xxhash.h ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libxxhash-dev cmake g++ >/dev/null
  else
    echo "build.sh: xxhash.h is missing; run: sudo apt-get install libxxhash-dev" >&2
    exit 1
  fi
fi

python -m pip install -q .
if [ "${1:-}" = "--dev" ]; then
  # torch is pinned to the CPU wheel the engines' CPU builds use; the core itself does not need it.
  python -m pip install -q "torch==2.13.0" "pytest>=8" "ruff>=0.6" "matplotlib>=3.6" "build>=1.0"
fi
