#!/usr/bin/env bash
# On a GPU machine: builds FlexKV with CUDA for this GPU, runs the gpu-marked tests (optionally under
# compute-sanitizer memcheck) and the GPU transfer benchmark. Logs go to $OUT (or ./gpu-suite-out).
#
#   benchmarks/gpu_suite.sh [build] [test] [ctest] [cppbench] [memcheck] [bench] [bench-quick] [layerwise] [pcie]
#
# DEPS_ROOT: a folder with usr/include/{xxhash.h,liburing.h,nlohmann/json.hpp} and
# usr/lib/x86_64-linux-gnu/liburing.a, for machines without libxxhash-dev, liburing-dev and nlohmann-json3-dev
# (unpack their .deb files there with dpkg -x).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu-suite-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
GPU_TESTS=("$REPO/tests/test_gpu_transfer.py" "$REPO/tests/test_trtllm_connector.py"
           "$REPO/tests/test_sglang_token_pool.py")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
status=0
deps_args() {
  if [ -n "${DEPS_ROOT:-}" ]; then
    echo "-DXXHASH_INCLUDE_DIR=$DEPS_ROOT/usr/include -DLIBURING_INCLUDE_DIR=$DEPS_ROOT/usr/include" \
      "-DNLOHMANN_JSON_INCLUDE_DIR=$DEPS_ROOT/usr/include" \
      "-DLIBURING_LIBRARY=$DEPS_ROOT/usr/lib/x86_64-linux-gnu/liburing.a"
  fi
}
run_step() {
  local step=$1
  case "$step" in
    build)
      args="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90} $(deps_args)"
      (cd "$REPO" && CMAKE_ARGS="$args" python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 |
        tee "$OUT/build.log" | tail -20)
      (cd /tmp && python3 -c "from flexkv import _core; assert _core.CUDA_BUILT and _core.cuda_available(), 'no CUDA'")
      ;;
    test)
      (cd /tmp && python3 -m pytest "${GPU_TESTS[@]}" -m gpu -q -p no:cacheprovider 2>&1 |
        tee "$OUT/test.log" | tail -25)
      ;;
    ctest)
      # The C++ tests and example with CUDA, the C++ API's GPU test and the copy-engine contract on the GPU among them.
      args="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90} -DFLEXKV_BUILD_PYTHON=OFF -DFLEXKV_BUILD_TESTS=ON"
      args="$args -DFLEXKV_BUILD_EXAMPLES=ON -DFLEXKV_BUILD_BENCHMARKS=ON $(deps_args)"
      # shellcheck disable=SC2086
      (cmake -S "$REPO" -B /tmp/flexkv-ctest $args > "$OUT/ctest-build.log" &&
        cmake --build /tmp/flexkv-ctest -j 16 >> "$OUT/ctest-build.log" 2>&1 &&
        cd /tmp/flexkv-ctest && ctest --output-on-failure 2>&1 | tee "$OUT/ctest.log" | tail -20 &&
        compute-sanitizer --tool memcheck --error-exitcode 9 ./test_cache_gpu 2>&1 | tee -a "$OUT/ctest.log" |
        tail -6 &&
        compute-sanitizer --tool memcheck --error-exitcode 9 ./test_copy_engine_gpu 2>&1 | tee -a "$OUT/ctest.log" |
        tail -6)
      ;;
    memcheck)
      (cd /tmp && compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
        python3 -m pytest "${GPU_TESTS[@]}" -m gpu -q -p no:cacheprovider -x 2>&1 |
        tee "$OUT/memcheck.log" | tail -15)
      ;;
    cppbench)
      # After ctest (which builds it): the C++ API moving a TensorRT-LLM-style pool.
      /tmp/flexkv-ctest/cache_pool_bandwidth 2>&1 | tee "$OUT/cppbench.log"
      ;;
    bench)
      (cd /tmp && python3 "$REPO/benchmarks/gpu_transfer.py" --json "$OUT/gpu_transfer.json" 2>&1 |
        tee "$OUT/bench.log")
      ;;
    bench-quick)
      (cd /tmp && python3 "$REPO/benchmarks/gpu_transfer.py" --total-mib 256 --repeat 3 \
        --json "$OUT/gpu_transfer.json" 2>&1 | tee "$OUT/bench.log")
      ;;
    layerwise)
      # The vLLM connector's load modes: a layer-wise load inside the forward vs a whole load before it.
      (cd /tmp && python3 "$REPO/benchmarks/gpu_layerwise.py" --json "$OUT/gpu_layerwise.json" 2>&1 |
        tee "$OUT/layerwise.log")
      ;;
    pcie)
      # The standalone PCIe path experiments (no FlexKV): kernel, staged DMA, split, both directions.
      nvcc -O3 -std=c++17 -arch="sm_${CUDA_ARCHS:-90}" "$REPO/benchmarks/cuda/pcie_paths.cu" -o /tmp/pcie_paths &&
        /tmp/pcie_paths 2>&1 | tee "$OUT/pcie.log"
      ;;
    *)
      echo "unknown step $step" >&2
      return 2
      ;;
  esac
}
for step in "${steps[@]}"; do
  echo "== $step"
  if ! run_step "$step"; then
    echo "== $step FAILED"
    status=1
    [ "$step" = build ] && break
  fi
done
exit $status
