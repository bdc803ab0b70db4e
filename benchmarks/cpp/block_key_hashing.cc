// Where the block-key hashing of a 128K-token prompt stands against what hashing could cost.
//
// Measures flexkv::chain_block_keys (csrc/index/block_key.cc: key[i] = XXH3-128(key[i-1] || the block's
// token ids packed as int32)) on one random 131072-token prompt at 16-, 32- and 64-token blocks, and two
// peers in the same run, on the same tokens:
//   independent  the same XXH3-128 inputs (a 16-byte key and the packed block), but no input waits for the
//                previous hash: the floor of this key format, whatever the order or the threads;
//   cheap chain  a different key format: XXH3-128 of the packed block alone, chained by two rounds of the
//                murmur3 finalizer (as salt_block_hashes mixes engine hashes); its blocks could be hashed
//                in parallel. Changing to it would change every key.
// Prints microseconds per prompt (best of --repeat) and each peer's time over chain_block_keys'.
//
//   g++ -O3 -std=c++17 -Icsrc benchmarks/cpp/block_key_hashing.cc csrc/index/block_key.cc -o /tmp/bkh
//   /tmp/bkh [repeat]      (add -march=native to see what this CPU's wider vectors change)
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "index/block_key.h"

namespace {

using flexkv::BlockKey;

template <typename F>
double best_us(F&& f, int repeat) {
  double best = 1e30;
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    if (us < best) best = us;
  }
  return best;
}

inline uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

}  // namespace

int main(int argc, char** argv) {
  const int repeat = argc > 1 ? std::atoi(argv[1]) : 200;
  const size_t n_tokens = 131072;
  std::vector<int64_t> tokens(n_tokens);
  std::mt19937_64 rng(0);
  for (auto& t : tokens) t = static_cast<int64_t>(rng() % 150000);
  std::vector<int32_t> packed(tokens.begin(), tokens.end());
  const BlockKey seed{0x0123456789abcdefull, 0xfedcba9876543210ull};
  volatile uint64_t sink = 0;

  std::printf("block_key_hashing: %zu tokens, best of %d; ratio = time / chain_block_keys' time\n", n_tokens, repeat);
  std::printf("%5s %7s %18s %22s %22s\n", "block", "blocks", "chain_block_keys us", "independent us (ratio)",
              "cheap chain us (ratio)");
  for (size_t tpb : {16, 32, 64}) {
    const size_t n = n_tokens / tpb;
    std::vector<BlockKey> keys(n);
    const double chained = best_us([&] {
      flexkv::chain_block_keys(seed, tokens.data(), n_tokens, tpb, keys.data());
      sink = sink + keys[n - 1].lo;
    }, repeat);
    std::vector<BlockKey> prev = keys;  // stand-in previous keys, known up front
    const double independent = best_us([&] {
      std::vector<unsigned char> buf(sizeof(BlockKey) + tpb * sizeof(int32_t));
      for (size_t b = 0; b < n; ++b) {
        std::memcpy(buf.data(), &prev[b], sizeof(BlockKey));
        const int64_t* blk = tokens.data() + b * tpb;
        auto* p = reinterpret_cast<int32_t*>(buf.data() + sizeof(BlockKey));
        for (size_t i = 0; i < tpb; ++i) p[i] = static_cast<int32_t>(blk[i]);
        const XXH128_hash_t h = XXH3_128bits(buf.data(), buf.size());
        keys[b] = BlockKey{h.low64, h.high64};
      }
      sink = sink + keys[n - 1].lo;
    }, repeat);
    const double cheap = best_us([&] {
      BlockKey k = seed;
      for (size_t b = 0; b < n; ++b) {
        const XXH128_hash_t h = XXH3_128bits(packed.data() + b * tpb, tpb * sizeof(int32_t));
        uint64_t lo = h.low64 ^ k.lo, hi = h.high64 ^ k.hi;
        hi ^= fmix64(lo);
        lo ^= fmix64(hi);
        k = BlockKey{lo, hi};
        keys[b] = k;
      }
      sink = sink + keys[n - 1].lo;
    }, repeat);
    std::printf("%5zu %7zu %18.1f %14.1f (%4.2fx) %14.1f (%4.2fx)\n", tpb, n, chained, independent,
                independent / chained, cheap, cheap / chained);
  }
  return 0;
}
