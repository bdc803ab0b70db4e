// The C++ API (flexkv::Cache) moving a TensorRT-LLM-style pool on a GPU, against one contiguous
// cudaMemcpyAsync of the same bytes between pinned host memory and the device, in the same run.
//
// Model: Qwen-32B's KV shape (64 layers, 8 KV heads, head size 128, bf16) in 16-token blocks, so a
// block is contiguous across layers: 4 MiB. A store copies 256 blocks (1 GiB) of random pool blocks to
// the CPU tier under fresh tokens; a load copies them back into other random blocks. Timed from the call
// to the end of wait(): hashing, index work and the copy. Best of --repeat, for the copy kernel and the
// copy-engine (DMA) paths.
//
//   cache_pool_bandwidth [--repeat 5]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "flexkv/cache.h"

namespace {

constexpr int kLayers = 64, kHeads = 8, kHeadSize = 128, kTpb = 16;
constexpr int64_t kPoolBlocks = 300, kMoved = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(2);
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double contiguous(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, int repeat) {
  cudaStream_t s;
  check(cudaStreamCreate(&s), "cudaStreamCreate");
  double best = 1e9;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    check(cudaMemcpyAsync(dst, src, bytes, kind, s), "cudaMemcpyAsync");
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    best = std::min(best, seconds_since(t0));
  }
  check(cudaStreamDestroy(s), "cudaStreamDestroy");
  return best;
}

struct PathResult {
  double store_s = 1e9, load_s = 1e9;
  bool exact = true;
};

PathResult run_path(bool copy_engine, void* pool, int repeat, std::mt19937_64& rng) {
  flexkv::ModelShape m;
  m.num_layers = kLayers;
  m.num_kv_heads = kHeads;
  m.head_size = kHeadSize;
  m.dtype = flexkv::DType::kBFloat16;
  flexkv::CacheOptions o;
  o.tokens_per_block = kTpb;
  o.num_cpu_blocks = 2 * kMoved;
  o.use_ce_transfer_h2d = o.use_ce_transfer_d2h = copy_engine;
  auto cache = flexkv::Cache::open(o, m);
  cache->register_memory(flexkv::EngineMemory::block_major_pool(pool, m.dtype, kPoolBlocks, kLayers, 2,
                                                                int64_t{kTpb} * kHeads * kHeadSize, 0));
  const size_t block = cache->block_bytes();
  std::vector<int64_t> ids(kPoolBlocks);
  std::iota(ids.begin(), ids.end(), 0);
  PathResult r;
  std::vector<int64_t> tokens(kMoved * kTpb);
  std::vector<int64_t> src, dst;
  for (int rep = 0; rep < repeat; ++rep) {
    std::shuffle(ids.begin(), ids.end(), rng);
    src.assign(ids.begin(), ids.begin() + kMoved);
    dst.assign(ids.begin() + (kPoolBlocks - kMoved), ids.end());  // overlaps src: loaded last, after the store
    for (auto& t : tokens) t = static_cast<int64_t>(rng() % 150000);
    auto t0 = std::chrono::steady_clock::now();
    const auto st = cache->store(tokens.data(), tokens.size(), src.data(), src.size());
    if (st.task == 0 || cache->wait(st.task, -1) != flexkv::TaskState::kDone) std::exit(3);
    r.store_s = std::min(r.store_s, seconds_since(t0));
    std::vector<uint8_t> want(block);
    check(cudaMemcpy(want.data(), static_cast<uint8_t*>(pool) + src[kMoved - 1] * block, block,
                     cudaMemcpyDeviceToHost), "cudaMemcpy");
    t0 = std::chrono::steady_clock::now();
    const auto ld = cache->load(tokens.data(), tokens.size(), 0, dst.data(), dst.size());
    if (ld.tokens != tokens.size() || cache->wait(ld.task, -1) != flexkv::TaskState::kDone) std::exit(4);
    r.load_s = std::min(r.load_s, seconds_since(t0));
    std::vector<uint8_t> got(block);
    check(cudaMemcpy(got.data(), static_cast<uint8_t*>(pool) + dst[kMoved - 1] * block, block,
                     cudaMemcpyDeviceToHost), "cudaMemcpy");
    r.exact = r.exact && std::memcmp(want.data(), got.data(), block) == 0;
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int repeat = 5;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--repeat") repeat = std::max(1, std::atoi(argv[i + 1]));
  }
  const size_t block = size_t{2} * kLayers * kTpb * kHeads * kHeadSize * 2;
  const size_t moved = kMoved * block;
  void* pool = nullptr;
  check(cudaMalloc(&pool, kPoolBlocks * block), "cudaMalloc");
  std::mt19937_64 rng(std::random_device{}());
  {
    std::vector<uint64_t> noise(kPoolBlocks * block / 8);
    for (auto& x : noise) x = rng();
    check(cudaMemcpy(pool, noise.data(), kPoolBlocks * block, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  void* pinned = nullptr;
  check(cudaMallocHost(&pinned, moved), "cudaMallocHost");
  std::memset(pinned, 1, moved);
  const double h2d = contiguous(pool, pinned, moved, cudaMemcpyHostToDevice, repeat);
  const double d2h = contiguous(pinned, pool, moved, cudaMemcpyDeviceToHost, repeat);
  const double gb = static_cast<double>(moved) / 1e9;
  std::printf("cache_pool_bandwidth: %lld blocks of %zu KiB (Qwen-32B, 16 tokens) per copy, best of %d; ratio = "
              "flexkv::Cache GB/s / one contiguous cudaMemcpyAsync GB/s (same run)\n",
              static_cast<long long>(kMoved), block >> 10, repeat);
  std::printf("  contiguous       host->GPU %7.2f GB/s   GPU->host %7.2f GB/s\n", gb / h2d, gb / d2h);
  for (const bool ce : {false, true}) {
    const PathResult r = run_path(ce, pool, repeat, rng);
    std::printf("  %-14s load (host->GPU) %7.2f GB/s ratio %.3f   store (GPU->host) %7.2f GB/s ratio %.3f   %s\n",
                ce ? "copy engine" : "copy kernel", gb / r.load_s, h2d / r.load_s, gb / r.store_s, d2h / r.store_s,
                r.exact ? "byte-exact" : "MISMATCH");
    if (!r.exact) return 1;
  }
  check(cudaFreeHost(pinned), "cudaFreeHost");
  check(cudaFree(pool), "cudaFree");
  return 0;
}
