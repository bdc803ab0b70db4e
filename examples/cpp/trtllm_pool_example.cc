// A C++ engine with a TensorRT-LLM-style KV pool ([num_blocks, layers, 2,
// tokens_per_block * kv_heads * head_size]) uses FlexKV through its C++ API:
// request A's prompt is stored when A finishes; request B shares A's first
// 40 tokens, so FlexKV finds them and loads them into B's fresh blocks.
//
//   trtllm_pool_example [flexkv_config.json]   (default: FLEXKV_CONFIG_PATH)
//
// Exits 0 when B's loaded blocks equal A's bytes, 1 otherwise.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "flexkv/cache.h"

namespace {

std::vector<int64_t> prompt(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int64_t> t(n);
  for (auto& x : t) x = static_cast<int64_t>(rng() % 32000);
  return t;
}

int run(const char* config_path) {
  const flexkv::CacheOptions options = flexkv::CacheOptions::from_file(config_path ? config_path : "");
  if (!options.model) {
    std::fprintf(stderr, "the config needs a model_config (num_layers, num_kv_heads, head_size, dtype)\n");
    return 2;
  }
  const flexkv::ModelShape& model = *options.model;
  auto cache = flexkv::Cache::open(options, model);
  const int tpb = cache->tokens_per_block();
  std::printf("opened FlexKV: %lld CPU blocks of %llu bytes (%d tokens each)\n",
              static_cast<long long>(cache->stats().capacity_blocks),
              static_cast<unsigned long long>(cache->block_bytes()), tpb);

  // The engine's pool, in host memory here; device >= 0 with CUDA memory on a GPU.
  const int64_t num_blocks = 64;
  std::vector<uint8_t> pool(static_cast<size_t>(num_blocks) * cache->block_bytes());
  cache->register_memory(flexkv::EngineMemory::block_major_pool(
      pool.data(), model.dtype, num_blocks, model.num_layers, model.kv_factor(),
      static_cast<int64_t>(tpb) * model.num_kv_heads * model.head_size));
  auto block = [&](int64_t b) { return pool.data() + b * cache->block_bytes(); };

  // Request A: 72 tokens in engine blocks 5, 9, 2, 14, 30 (the last one partial); prefill wrote them.
  const std::vector<int64_t> a = prompt(72, 1);
  const std::vector<int64_t> a_blocks = {5, 9, 2, 14, 30};
  std::mt19937 rng(std::random_device{}());
  for (int64_t b : a_blocks) {
    for (uint64_t i = 0; i < cache->block_bytes(); ++i) block(b)[i] = static_cast<uint8_t>(rng());
  }
  const flexkv::StoreResult stored = cache->store(a.data(), a.size(), a_blocks.data(), a_blocks.size());
  if (stored.task != 0 && cache->wait(stored.task, -1) != flexkv::TaskState::kDone) return 1;
  std::printf("request A finished: stored %zu blocks (%zu tokens)\n", stored.new_blocks, stored.new_blocks * tpb);

  // Request B: A's first 40 tokens, then its own.
  std::vector<int64_t> b = prompt(100, 2);
  std::copy(a.begin(), a.begin() + 40, b.begin());
  const size_t hit = cache->match(b.data(), b.size());
  std::printf("request B: FlexKV matched %zu of %zu prompt tokens\n", hit, b.size());
  const std::vector<int64_t> b_blocks = {40, 41, 42, 43, 44, 45, 46};
  for (int64_t id : b_blocks) std::memset(block(id), 0xFF, cache->block_bytes());
  const flexkv::LoadResult loaded = cache->load(b.data(), b.size(), 0, b_blocks.data(), b_blocks.size());
  std::string error;
  if (loaded.task != 0 && cache->wait(loaded.task, -1, &error) != flexkv::TaskState::kDone) {
    std::printf("load failed: %s\n", error.c_str());
    return 1;
  }
  bool same = loaded.engine_blocks > 0;
  for (size_t i = 0; i < loaded.engine_blocks; ++i) {
    same = same && std::memcmp(block(b_blocks[i]), block(a_blocks[i]), cache->block_bytes()) == 0;
  }
  std::printf("request B: loaded %zu tokens into %zu engine blocks; identical to request A's blocks: %s\n",
              loaded.tokens, loaded.engine_blocks, same ? "yes" : "NO");
  std::printf("the engine computes the remaining %zu tokens\n", b.size() - loaded.tokens);
  return same && loaded.tokens == hit && hit == 32 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc > 1 ? argv[1] : nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
