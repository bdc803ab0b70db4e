// The GPU data plane in a build without CUDA: the queries say so and
// make_gpu_copy_engine refuses, naming what would give the build CUDA support.
#include <stdexcept>

#include "transfer/copy_engine.h"

namespace flexkv {

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
bool cuda_available() { return false; }

std::unique_ptr<CopyEngine> make_gpu_copy_engine(const GpuCopyOptions&) {
  throw std::runtime_error(
      "this FlexKV build has no CUDA support: nvcc was not found when it was built; rebuild with the CUDA "
      "toolkit (12.x or 13.x) on PATH, e.g. `CUDACXX=/usr/local/cuda/bin/nvcc ./build.sh`");
}

}  // namespace flexkv
