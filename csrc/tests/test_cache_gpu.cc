// The C++ API on CUDA engine memory: a TensorRT-LLM-style pool in device memory is stored to the CPU
// tier and loaded back byte-exact, with both copy paths. Built when CUDA is found; run on a GPU.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "flexkv/cache.h"
#include "transfer/copy_engine.h"

using flexkv::Cache;
using flexkv::CacheOptions;
using flexkv::EngineMemory;
using flexkv::ModelShape;
using flexkv::TaskState;

namespace {

void round_trip(bool copy_engine) {
  ModelShape m;
  m.num_layers = 4;
  m.num_kv_heads = 2;
  m.head_size = 128;
  m.dtype = flexkv::DType::kBFloat16;
  CacheOptions o;
  o.tokens_per_block = 16;
  o.num_cpu_blocks = 64;
  o.use_ce_transfer_h2d = o.use_ce_transfer_d2h = copy_engine;
  auto cache = Cache::open(o, m);
  const int64_t nb = 32;
  const size_t block = cache->block_bytes();
  void* pool = nullptr;
  CHECK_EQ(cudaMalloc(&pool, nb * block), cudaSuccess);
  cache->register_memory(EngineMemory::block_major_pool(pool, m.dtype, nb, m.num_layers, 2,
                                                        16 * m.num_kv_heads * m.head_size, 0));
  std::mt19937 rng(std::random_device{}());
  std::vector<uint8_t> host(nb * block);
  for (auto& x : host) x = static_cast<uint8_t>(rng());
  CHECK_EQ(cudaMemcpy(pool, host.data(), host.size(), cudaMemcpyHostToDevice), cudaSuccess);

  std::vector<int64_t> tokens(100);
  for (auto& t : tokens) t = static_cast<int64_t>(rng() % 32000);
  const std::vector<int64_t> src = {3, 17, 8, 30, 1, 22, 9};
  const auto st = cache->store(tokens.data(), tokens.size(), src.data(), src.size());
  CHECK_EQ(st.new_blocks, 6u);
  std::string error;
  CHECK(cache->wait(st.task, -1, &error) == TaskState::kDone);
  CHECK(error.empty());

  const std::vector<int64_t> dst = {0, 2, 4, 5, 6, 7};
  for (int64_t b : dst) CHECK_EQ(cudaMemset(static_cast<uint8_t*>(pool) + b * block, 0xA5, block), cudaSuccess);
  CHECK_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto ld = cache->load(tokens.data(), tokens.size(), 0, dst.data(), dst.size());
  CHECK_EQ(ld.tokens, 96u);
  CHECK(cache->wait(ld.task, -1, &error) == TaskState::kDone);
  std::vector<uint8_t> back(nb * block);
  CHECK_EQ(cudaMemcpy(back.data(), pool, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (size_t i = 0; i < dst.size(); ++i) {
    CHECK(std::memcmp(back.data() + dst[i] * block, host.data() + src[i] * block, block) == 0);
  }
  CHECK_EQ(cache->stats().locked_blocks, 0);
  cache.reset();
  CHECK_EQ(cudaFree(pool), cudaSuccess);
}

}  // namespace

TEST(cuda_pool_round_trip_with_the_copy_kernel) { round_trip(false); }
TEST(cuda_pool_round_trip_with_the_copy_engine) { round_trip(true); }

int main() {
  if (!flexkv::cuda_available()) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  return flexkv_test::run_all();
}
