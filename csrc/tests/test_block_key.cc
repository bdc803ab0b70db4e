#include <random>
#include <set>
#include <vector>

#include "check.h"
#include "index/block_key.h"

using flexkv::BlockKey;

static std::vector<int64_t> random_tokens(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int64_t> t(n);
  for (auto& x : t) x = static_cast<int64_t>(rng() % 150000);
  return t;
}

TEST(only_whole_blocks_get_keys) {
  auto t = random_tokens(50, 1);
  std::vector<BlockKey> out(4);
  CHECK_EQ(flexkv::chain_block_keys(flexkv::namespace_key("m"), t.data(), t.size(), 16, out.data()), 3u);
  CHECK_EQ(flexkv::chain_block_keys(flexkv::namespace_key("m"), t.data(), 15, 16, out.data()), 0u);
}

TEST(keys_depend_on_the_whole_prefix) {
  auto a = random_tokens(64, 2);
  auto b = a;
  b[3] += 1;  // differs in block 0 only
  std::vector<BlockKey> ka(4), kb(4);
  const BlockKey seed = flexkv::namespace_key("model");
  flexkv::chain_block_keys(seed, a.data(), a.size(), 16, ka.data());
  flexkv::chain_block_keys(seed, b.data(), b.size(), 16, kb.data());
  for (int i = 0; i < 4; ++i) CHECK(ka[i] != kb[i]);  // blocks 1..3 have equal tokens but another prefix
}

TEST(keys_are_deterministic_and_prefix_stable) {
  auto a = random_tokens(128, 3);
  std::vector<BlockKey> full(8), half(4);
  const BlockKey seed = flexkv::namespace_key("model");
  flexkv::chain_block_keys(seed, a.data(), 128, 16, full.data());
  flexkv::chain_block_keys(seed, a.data(), 64, 16, half.data());
  for (int i = 0; i < 4; ++i) CHECK(full[i] == half[i]);
}

TEST(namespaces_never_share_keys) {
  auto a = random_tokens(64, 4);
  std::vector<BlockKey> k1(4), k2(4);
  flexkv::chain_block_keys(flexkv::namespace_key("model|tp1"), a.data(), 64, 16, k1.data());
  flexkv::chain_block_keys(flexkv::namespace_key("model|tp2"), a.data(), 64, 16, k2.data());
  std::set<std::pair<uint64_t, uint64_t>> all;
  for (auto& k : k1) all.insert({k.lo, k.hi});
  for (auto& k : k2) all.insert({k.lo, k.hi});
  CHECK_EQ(all.size(), 8u);
}

TEST(ids_beyond_int32_hash_apart_from_their_truncation) {
  std::vector<int64_t> a(16, 7), b(16, 7);
  b[5] = int64_t{7} + (int64_t{1} << 32);  // same low 32 bits as a[5]
  std::vector<BlockKey> ka(1), kb(1);
  const BlockKey seed = flexkv::namespace_key("model");
  flexkv::chain_block_keys(seed, a.data(), 16, 16, ka.data());
  flexkv::chain_block_keys(seed, b.data(), 16, 16, kb.data());
  CHECK(ka[0] != kb[0]);
  std::vector<int64_t> c(16, -1), d(16, 0xFFFFFFFF);  // -1 packs as 0xFFFFFFFF; 0xFFFFFFFF does not fit
  std::vector<BlockKey> kc(1), kd(1);
  flexkv::chain_block_keys(seed, c.data(), 16, 16, kc.data());
  flexkv::chain_block_keys(seed, d.data(), 16, 16, kd.data());
  CHECK(kc[0] != kd[0]);
}

TEST_MAIN()
