#include <algorithm>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "flexkv/cache.h"
#include "transfer/copy_engine.h"

using flexkv::Cache;
using flexkv::CacheOptions;
using flexkv::DType;
using flexkv::EngineMemory;
using flexkv::ModelShape;
using flexkv::TaskState;

namespace {

constexpr int kTpb = 4;

ModelShape shape(bool mla = false) {
  ModelShape m;
  m.num_layers = 3;
  m.num_kv_heads = 2;
  m.head_size = 8;
  m.dtype = DType::kFloat16;
  m.use_mla = mla;
  return m;
}

CacheOptions options(int64_t blocks) {
  CacheOptions o;
  o.tokens_per_block = kTpb;
  o.num_cpu_blocks = blocks;
  return o;
}

// A TensorRT-LLM-style pool [num_blocks, layers, kv, tpb * heads * head_size] in host memory.
struct Pool {
  ModelShape m;
  int64_t num_blocks;
  std::vector<uint8_t> bytes;
  Pool(const ModelShape& model, int64_t n) : m(model), num_blocks(n), bytes(n * model.block_bytes(kTpb)) {}
  uint8_t* block(int64_t b) { return bytes.data() + b * m.block_bytes(kTpb); }
  EngineMemory memory() {
    return EngineMemory::block_major_pool(bytes.data(), m.dtype, num_blocks, m.num_layers, m.kv_factor(),
                                          kTpb * m.num_kv_heads * m.head_size);
  }
  void fill(const std::vector<int64_t>& ids, std::mt19937& rng) {
    for (int64_t b : ids) {
      for (uint64_t i = 0; i < m.block_bytes(kTpb); ++i) block(b)[i] = static_cast<uint8_t>(rng());
    }
  }
  void poison(const std::vector<int64_t>& ids) {
    for (int64_t b : ids) std::memset(block(b), 0xA5, m.block_bytes(kTpb));
  }
  bool same(int64_t a, int64_t b) { return std::memcmp(block(a), block(b), m.block_bytes(kTpb)) == 0; }
};

std::vector<int64_t> tokens(size_t n, int64_t first) {
  std::vector<int64_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = first + static_cast<int64_t>(i);
  return t;
}

void finish(Cache& c, flexkv::TaskId task) {
  if (task == 0) return;
  std::string error;
  CHECK(c.wait(task, -1, &error) == TaskState::kDone);
  CHECK(error.empty());
}

}  // namespace

TEST(stored_prefix_loads_back_byte_exact) {
  std::mt19937 rng(std::random_device{}());
  auto cache = Cache::open(options(64), shape());
  Pool pool(shape(), 32);
  cache->register_memory(pool.memory());

  const auto prompt = tokens(22, 1000);  // 5 whole blocks and 2 tokens
  const std::vector<int64_t> src = {7, 3, 19, 0, 12, 30};
  pool.fill(src, rng);
  const auto st = cache->store(prompt.data(), prompt.size(), src.data(), src.size());
  CHECK_EQ(st.new_blocks, 5u);
  CHECK_EQ(st.cached_blocks, 0u);
  finish(*cache, st.task);
  CHECK_EQ(cache->match(prompt.data(), prompt.size()), 20u);

  const std::vector<int64_t> dst = {1, 2, 4, 5, 6};
  pool.poison(dst);
  const auto ld = cache->load(prompt.data(), prompt.size(), 0, dst.data(), dst.size());
  CHECK_EQ(ld.tokens, 20u);
  CHECK_EQ(ld.engine_blocks, 5u);
  finish(*cache, ld.task);
  for (size_t i = 0; i < 5; ++i) CHECK(pool.same(src[i], dst[i]));
  const auto s = cache->stats();
  CHECK_EQ(s.stored_blocks, 5);
  CHECK_EQ(s.loaded_blocks, 5);
  CHECK_EQ(s.locked_blocks, 0);
  CHECK_EQ(s.tasks_in_flight, 0);
}

TEST(shared_prefix_and_computed_tokens) {
  std::mt19937 rng(std::random_device{}());
  auto cache = Cache::open(options(64), shape());
  Pool pool(shape(), 32);
  cache->register_memory(pool.memory());
  auto a = tokens(16, 0);
  const std::vector<int64_t> src = {0, 1, 2, 3};
  pool.fill(src, rng);
  finish(*cache, cache->store(a.data(), a.size(), src.data(), src.size()).task);

  // b shares the first 9 tokens: two whole blocks.
  auto b = a;
  b[9] = -5;
  CHECK_EQ(cache->match(b.data(), b.size()), 8u);
  // The engine already holds block 0; FlexKV loads block 1 only, into engine block 9.
  const std::vector<int64_t> dst = {9, 10, 11};
  pool.poison(dst);
  const auto ld = cache->load(b.data(), b.size(), kTpb, dst.data(), dst.size());
  CHECK_EQ(ld.tokens, 4u);
  finish(*cache, ld.task);
  CHECK(pool.same(1, 9));
  std::vector<uint8_t> poison(pool.m.block_bytes(kTpb), 0xA5);
  CHECK(std::memcmp(pool.block(10), poison.data(), poison.size()) == 0);

  // A store of b copies only the blocks FlexKV does not hold.
  const std::vector<int64_t> bsrc = {0, 1, 12, 13};
  pool.fill({12, 13}, rng);
  const auto st = cache->store(b.data(), b.size(), bsrc.data(), bsrc.size());
  CHECK_EQ(st.cached_blocks, 2u);
  CHECK_EQ(st.new_blocks, 2u);
  finish(*cache, st.task);
  CHECK_EQ(cache->match(b.data(), b.size()), 16u);
  CHECK_EQ(cache->match(a.data(), a.size()), 16u);
  // Nothing to load past what the engine has.
  CHECK_EQ(cache->load(a.data(), a.size(), 16, dst.data(), dst.size()).task, 0u);
  CHECK_THROWS(cache->load(a.data(), a.size(), 3, dst.data(), dst.size()));
}

TEST(salts_and_shapes_never_share) {
  std::mt19937 rng(std::random_device{}());
  auto cache = Cache::open(options(64), shape());
  Pool pool(shape(), 8);
  cache->register_memory(pool.memory());
  const auto t = tokens(8, 42);
  const std::vector<int64_t> src = {0, 1};
  pool.fill(src, rng);
  finish(*cache, cache->store(t.data(), t.size(), src.data(), src.size(), "tenant-a").task);
  CHECK_EQ(cache->match(t.data(), t.size(), "tenant-a"), 8u);
  CHECK_EQ(cache->match(t.data(), t.size(), "tenant-b"), 0u);
  CHECK_EQ(cache->match(t.data(), t.size()), 0u);
  const std::vector<int64_t> dst = {5, 6};
  CHECK_EQ(cache->load(t.data(), t.size(), 0, dst.data(), dst.size(), "tenant-b").task, 0u);
}

TEST(mla_and_per_layer_buffers) {
  std::mt19937 rng(std::random_device{}());
  const ModelShape m = shape(true);
  auto cache = Cache::open(options(16), m);
  const int64_t nb = 6;
  const uint64_t chunk = m.chunk_bytes(kTpb);
  std::vector<std::vector<uint8_t>> layers(m.num_layers, std::vector<uint8_t>(nb * chunk));
  std::vector<void*> bases;
  for (auto& l : layers) {
    for (auto& x : l) x = static_cast<uint8_t>(rng());
    bases.push_back(l.data());
  }
  cache->register_memory(EngineMemory::per_layer_buffers(bases, m.dtype, nb, m.num_layers, 1,
                                                         kTpb * m.num_kv_heads * m.head_size));
  const auto t = tokens(8, 7);
  const std::vector<int64_t> src = {4, 2};
  finish(*cache, cache->store(t.data(), t.size(), src.data(), src.size()).task);
  const std::vector<int64_t> dst = {0, 5};
  for (auto& l : layers) {
    std::memset(l.data() + 0 * chunk, 0x11, chunk);
    std::memset(l.data() + 5 * chunk, 0x11, chunk);
  }
  finish(*cache, cache->load(t.data(), t.size(), 0, dst.data(), dst.size()).task);
  for (auto& l : layers) {
    CHECK(std::memcmp(l.data() + 4 * chunk, l.data() + 0 * chunk, chunk) == 0);
    CHECK(std::memcmp(l.data() + 2 * chunk, l.data() + 5 * chunk, chunk) == 0);
  }
}

TEST(a_full_tier_evicts_the_least_recently_used_prefix) {
  std::mt19937 rng(std::random_device{}());
  auto cache = Cache::open(options(4), shape());
  Pool pool(shape(), 16);
  cache->register_memory(pool.memory());
  const auto a = tokens(8, 0), b = tokens(8, 100), d = tokens(8, 200), c = tokens(16, 300);
  const std::vector<int64_t> ab = {0, 1}, bb = {2, 3}, db = {4, 5}, cb = {4, 5, 6, 7};
  pool.fill({0, 1, 2, 3, 4, 5, 6, 7}, rng);
  finish(*cache, cache->store(a.data(), a.size(), ab.data(), ab.size()).task);
  finish(*cache, cache->store(b.data(), b.size(), bb.data(), bb.size()).task);
  // Loading a makes b the least recently used prefix.
  const std::vector<int64_t> dst = {10, 11};
  finish(*cache, cache->load(a.data(), a.size(), 0, dst.data(), dst.size()).task);
  finish(*cache, cache->store(d.data(), d.size(), db.data(), db.size()).task);
  CHECK_EQ(cache->match(a.data(), a.size()), 8u);
  CHECK_EQ(cache->match(b.data(), b.size()), 0u);
  CHECK_EQ(cache->match(d.data(), d.size()), 8u);
  // A sequence longer than the tier stores the prefix that fits.
  const auto st = cache->store(c.data(), c.size(), cb.data(), cb.size());
  CHECK_EQ(st.new_blocks, 4u);
  finish(*cache, st.task);
  CHECK_EQ(cache->match(c.data(), c.size()), 16u);
  CHECK(cache->stats().evicted_blocks >= 6);
}

TEST(bad_input_is_refused_and_leaves_nothing_locked) {
  std::mt19937 rng(std::random_device{}());
  auto cache = Cache::open(options(16), shape());
  Pool pool(shape(), 8);
  const auto t = tokens(8, 0);
  const std::vector<int64_t> ok = {0, 1}, out_of_range = {0, 8}, negative = {-1, 0};
  CHECK_THROWS(cache->store(t.data(), t.size(), ok.data(), ok.size()));  // before register_memory

  EngineMemory wrong_dtype = pool.memory();
  wrong_dtype.dtype = DType::kBFloat16;
  CHECK_THROWS(cache->register_memory(wrong_dtype));
  EngineMemory wrong_layers = EngineMemory::block_major_pool(pool.bytes.data(), DType::kFloat16, 8, 2, 2,
                                                             kTpb * 2 * 8);
  CHECK_THROWS(cache->register_memory(wrong_layers));
  EngineMemory small_stride = pool.memory();
  small_stride.planes[1].block_stride_bytes = 8;
  CHECK_THROWS(cache->register_memory(small_stride));
  cache->register_memory(pool.memory());
  CHECK_THROWS(cache->register_memory(pool.memory()));

  pool.fill(ok, rng);
  bool named = false;
  try {
    cache->store(t.data(), t.size(), out_of_range.data(), out_of_range.size());
  } catch (const std::out_of_range& e) {
    named = std::string(e.what()).find("engine_blocks[1] = 8") != std::string::npos;
  }
  CHECK(named);
  CHECK_THROWS(cache->store(t.data(), t.size(), negative.data(), negative.size()));
  CHECK_THROWS(cache->store(t.data(), t.size(), ok.data(), 1));  // too few engine blocks
  CHECK_EQ(cache->stats().locked_blocks, 0);
  CHECK_EQ(cache->stats().cached_blocks, 0);

  finish(*cache, cache->store(t.data(), t.size(), ok.data(), ok.size()).task);
  CHECK_THROWS(cache->load(t.data(), t.size(), 0, out_of_range.data(), out_of_range.size()));
  CHECK_EQ(cache->stats().locked_blocks, 0);
  CHECK_EQ(cache->match(t.data(), t.size()), 8u);

  CHECK_THROWS(cache->poll(12345));
  const auto ld = cache->load(t.data(), t.size(), 0, ok.data(), ok.size());
  finish(*cache, ld.task);
  CHECK_THROWS(cache->poll(ld.task));  // reported once, then forgotten
  CHECK_THROWS(Cache::open(options(0), shape()));
  ModelShape zero = shape();
  zero.num_layers = 0;
  CHECK_THROWS(Cache::open(options(4), zero));
  CacheOptions huge = options(2000000000);
  huge.tokens_per_block = 4096;
  CHECK_THROWS(Cache::open(huge, shape()));  // more than this machine's memory
}

TEST(concurrent_requests_from_several_threads) {
  auto cache = Cache::open(options(256), shape());
  Pool pool(shape(), 64);
  cache->register_memory(pool.memory());
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937 rng(static_cast<uint32_t>(w) + std::random_device{}());
      const std::vector<int64_t> src = {w * 16 + 0, w * 16 + 1, w * 16 + 2, w * 16 + 3};
      const std::vector<int64_t> dst = {w * 16 + 8, w * 16 + 9, w * 16 + 10, w * 16 + 11};
      int good = 0;
      for (int round = 0; round < 20; ++round) {
        const auto t = tokens(16, (w * 1000 + round) * 100);
        pool.fill(src, rng);
        const auto st = cache->store(t.data(), t.size(), src.data(), src.size());
        if (st.task != 0 && cache->wait(st.task, -1) != TaskState::kDone) continue;
        pool.poison(dst);
        const auto ld = cache->load(t.data(), t.size(), 0, dst.data(), dst.size());
        if (ld.tokens != 16 || cache->wait(ld.task, -1) != TaskState::kDone) continue;
        bool same = true;
        for (int i = 0; i < 4; ++i) same = same && pool.same(src[i], dst[i]);
        good += same ? 1 : 0;
      }
      ok[w] = good;
    });
  }
  for (auto& th : threads) th.join();
  for (int w = 0; w < 4; ++w) CHECK_EQ(ok[w], 20);
  CHECK_EQ(cache->stats().locked_blocks, 0);
}

TEST(gpu_memory_without_cuda_is_a_clear_error) {
  if (flexkv::cuda_available()) return;  // covered by the GPU machine's run of this binary
  auto cache = Cache::open(options(4), shape());
  Pool pool(shape(), 4);
  EngineMemory m = pool.memory();
  m.device = 0;
  bool said = false;
  try {
    cache->register_memory(m);
  } catch (const flexkv::LayoutError& e) {
    said = std::string(e.what()).find("CUDA") != std::string::npos;
  }
  CHECK(said);
}

TEST_MAIN()
