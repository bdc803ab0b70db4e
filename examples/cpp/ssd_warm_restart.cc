// The C++ API's SSD tier: blocks evicted from a small CPU tier come back from
// SSD byte-exact, a block whose bytes on SSD were damaged is a miss (never
// wrong bytes), and a fresh process finds what an earlier one stored.
//
//   ssd_warm_restart CONFIG store SEED   stores 3 prompts of 6 blocks (the CPU tier holds 8 blocks) and
//                                        waits for their write-through; loads prompt 0 back from SSD; prints
//                                        the first bytes of every block ("head p.b <hex>") so a test can
//                                        find a block in the SSD files
//   ssd_warm_restart CONFIG check SEED   a later process: loads every prompt from SSD; prints per prompt
//                                        the tokens matched, loaded, and whether they are byte-exact
//
// CONFIG enables the SSD tier (ssd_warm_restart.json). Block bytes are derived from SEED, prompt and
// block index, so the check knows what each block must hold. Exits 0 when every loaded block is exact.
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "flexkv/cache.h"

namespace {

constexpr int kPrompts = 3;
constexpr int kBlocksPerPrompt = 6;

std::vector<int64_t> prompt_tokens(uint32_t seed, int p, int tpb) {
  std::mt19937 rng(seed * 31 + p);
  std::vector<int64_t> t(static_cast<size_t>(kBlocksPerPrompt * tpb));
  for (auto& x : t) x = static_cast<int64_t>(rng() % 32000);
  return t;
}

void block_bytes(uint32_t seed, int p, int b, uint8_t* out, uint64_t n) {
  std::mt19937 rng(seed * 1009 + p * 97 + b);
  for (uint64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(rng());
}

int run(const std::string& config, const std::string& phase, uint32_t seed) {
  const flexkv::CacheOptions options = flexkv::CacheOptions::from_file(config);
  if (!options.model || !options.enable_ssd) {
    std::fprintf(stderr, "%s needs a model_config and an SSD tier\n", config.c_str());
    return 2;
  }
  auto cache = flexkv::Cache::open(options, *options.model);
  const int tpb = cache->tokens_per_block();
  const uint64_t bytes = cache->block_bytes();
  const int64_t engine_blocks = kPrompts * kBlocksPerPrompt;
  std::vector<uint8_t> pool(static_cast<size_t>(engine_blocks) * bytes);
  const flexkv::ModelShape& m = *options.model;
  cache->register_memory(flexkv::EngineMemory::block_major_pool(pool.data(), m.dtype, engine_blocks, m.num_layers,
                                                                m.kv_factor(),
                                                                static_cast<int64_t>(tpb) * m.num_kv_heads * m.head_size));
  auto block = [&](int64_t b) { return pool.data() + b * bytes; };
  std::printf("restored %lld blocks from SSD\n", static_cast<long long>(cache->stats().ssd_cached_blocks));

  if (phase == "store") {
    for (int p = 0; p < kPrompts; ++p) {
      std::vector<int64_t> ids;
      for (int b = 0; b < kBlocksPerPrompt; ++b) {
        ids.push_back(p * kBlocksPerPrompt + b);
        block_bytes(seed, p, b, block(ids.back()), bytes);
      }
      const std::vector<int64_t> tokens = prompt_tokens(seed, p, tpb);
      const flexkv::StoreResult s = cache->store(tokens.data(), tokens.size(), ids.data(), ids.size());
      if (s.task == 0 || cache->wait(s.task, -1) != flexkv::TaskState::kDone) return 1;
      if (!cache->flush(-1)) return 1;  // on SSD before the next prompt evicts it from the CPU tier
      for (int b = 0; b < kBlocksPerPrompt; ++b) {
        std::printf("head %d.%d ", p, b);
        for (int i = 0; i < 32; ++i) std::printf("%02x", block(p * kBlocksPerPrompt + b)[i]);
        std::printf("\n");
      }
    }
  }
  bool exact = true;
  const int checked = phase == "store" ? 1 : kPrompts;
  for (int p = 0; p < checked; ++p) {
    const std::vector<int64_t> tokens = prompt_tokens(seed, p, tpb);
    std::vector<int64_t> dst;
    for (int b = 0; b < kBlocksPerPrompt; ++b) dst.push_back(p * kBlocksPerPrompt + b);
    for (int64_t d : dst) std::memset(block(d), 0xA5, bytes);  // poison: an unwritten block cannot pass
    const size_t matched = cache->match(tokens.data(), tokens.size());
    const flexkv::LoadResult l = cache->load(tokens.data(), tokens.size(), 0, dst.data(), dst.size());
    std::string error;
    const flexkv::TaskState state = l.task == 0 ? flexkv::TaskState::kFailed : cache->wait(l.task, -1, &error);
    // A load that failed verification delivered its verified prefix: that prefix must be exact.
    size_t good = 0;
    std::vector<uint8_t> want(bytes);
    for (size_t b = 0; b < l.engine_blocks; ++b) {
      block_bytes(seed, p, static_cast<int>(b), want.data(), bytes);
      if (std::memcmp(block(dst[b]), want.data(), bytes) != 0) break;
      ++good;
    }
    const size_t rematched = cache->match(tokens.data(), tokens.size());
    std::printf("prompt %d: matched %zu tokens, load %s (%s), %zu of %zu blocks exact, matched after %zu\n", p,
                matched, state == flexkv::TaskState::kDone ? "done" : "failed", error.c_str(), good,
                l.engine_blocks, rematched);
    if (state == flexkv::TaskState::kDone) exact = exact && good == l.engine_blocks;
  }
  const flexkv::CacheStats s = cache->stats();
  std::printf("ssd: %lld blocks written, %lld brought up, %lld did not verify\n",
              static_cast<long long>(s.ssd_written_blocks), static_cast<long long>(s.ssd_hit_blocks),
              static_cast<long long>(s.ssd_mismatch_blocks));
  return exact ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s CONFIG store|check SEED\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1], argv[2], static_cast<uint32_t>(std::stoul(argv[3])));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
