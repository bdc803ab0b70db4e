// The CopyEngine contract on the GPU copy engine (engine memory on CUDA device
// 0), once per path. Built when CUDA is found; exits 77 (skipped) without a device.
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <utility>
#include <string>

#include "copy_engine_contract.h"

namespace contract {

namespace {

void ok(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Device memory, written and read on a stream of its own and synchronized, so
// that every write has landed before the engine's streams see the block.
struct DeviceMemory : EngineMemory {
  cudaStream_t stream = nullptr;
  cudaStream_t s() {
    if (stream == nullptr) ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    return stream;
  }
  uint8_t* alloc(size_t bytes) override {
    void* p = nullptr;
    ok(cudaMalloc(&p, bytes), "cudaMalloc");
    return static_cast<uint8_t*>(p);
  }
  void release(uint8_t* p) override { cudaFree(p); }
  void write(uint8_t* dst, const uint8_t* src, size_t n) override {
    ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s()), "cudaMemcpyAsync");
    ok(cudaStreamSynchronize(s()), "cudaStreamSynchronize");
  }
  void read(uint8_t* dst, const uint8_t* src, size_t n) override {
    ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s()), "cudaMemcpyAsync");
    ok(cudaStreamSynchronize(s()), "cudaStreamSynchronize");
  }
};

flexkv::GpuCopyPath g_path = flexkv::GpuCopyPath::kKernel;

}  // namespace

std::unique_ptr<CopyEngine> make_engine(int) {
  flexkv::GpuCopyOptions o;
  o.path_h2d = o.path_d2h = g_path;
  return flexkv::make_gpu_copy_engine(o);
}

EngineMemory& engine_memory() {
  static DeviceMemory m;
  return m;
}

}  // namespace contract

TEST(gpu_engine_names_its_device_and_streams) {
  auto e = contract::make_engine(1);
  CHECK(e->name() == "cuda:0");
  CHECK_EQ(e->device(), 0);
  CHECK(e->stream(flexkv::CopyDirection::kHostToEngine) != nullptr);
  CHECK(e->stream(flexkv::CopyDirection::kHostToEngine) != e->stream(flexkv::CopyDirection::kEngineToHost));
}

int main() {
  if (!flexkv::cuda_available()) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  int rc = 0;
  const std::pair<flexkv::GpuCopyPath, const char*> paths[] = {{flexkv::GpuCopyPath::kKernel, "kernel"},
                                                                 {flexkv::GpuCopyPath::kCopyEngine, "copy_engine"},
                                                                 {flexkv::GpuCopyPath::kStaged, "staged"}};
  for (const auto& [path, name] : paths) {
    contract::g_path = path;
    std::printf("path: %s\n", name);
    rc |= flexkv_test::run_all();
  }
  return rc;
}
