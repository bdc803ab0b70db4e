// GpuCopyEngine in a build without CUDA: the queries say so and the engine
// refuses to start, naming what would give it CUDA support.
#include <stdexcept>

#include "transfer/gpu_copy_engine.h"

namespace flexkv {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "this FlexKV build has no CUDA support: nvcc was not found when it was built; rebuild with the CUDA "
      "toolkit (12.x or 13.x) on PATH, e.g. `CUDACXX=/usr/local/cuda/bin/nvcc ./build.sh`");
}
}  // namespace

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
bool cuda_available() { return false; }

struct GpuCopyEngine::Impl {};
struct GpuCopyEngine::Job {};

GpuCopyEngine::GpuCopyEngine(const GpuCopyOptions& options) : options_(options) { no_cuda(); }
GpuCopyEngine::~GpuCopyEngine() = default;
void GpuCopyEngine::register_host(uint64_t, uint64_t) { no_cuda(); }
void GpuCopyEngine::unregister_host(uint64_t) { no_cuda(); }
void GpuCopyEngine::check_device_layout(const EngineLayout&, const HostRegion&) const { no_cuda(); }
uint64_t GpuCopyEngine::submit(CopyDirection, const EngineLayout&, const HostRegion&, const int64_t*,
                               const int64_t*, size_t, bool, bool) {
  no_cuda();
}
bool GpuCopyEngine::wait(uint64_t, int64_t) { no_cuda(); }
uint64_t GpuCopyEngine::wait_any(int64_t) { no_cuda(); }
bool GpuCopyEngine::done(uint64_t) { no_cuda(); }
std::string GpuCopyEngine::take_error(uint64_t) { no_cuda(); }
void GpuCopyEngine::wait_group(uint64_t, int32_t) { no_cuda(); }
void GpuCopyEngine::stream_wait_group(uint64_t, int32_t, void*) { no_cuda(); }
void* GpuCopyEngine::load_stream() const { no_cuda(); }
void* GpuCopyEngine::store_stream() const { no_cuda(); }

}  // namespace flexkv
