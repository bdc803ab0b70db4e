#include "index/block_key.h"

#include <cstdint>
#include <cstring>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace flexkv {
namespace {

BlockKey from_xxh(XXH128_hash_t h) { return BlockKey{h.low64, h.high64}; }

}  // namespace

BlockKey namespace_key(std::string_view ns) {
  return from_xxh(XXH3_128bits(ns.data(), ns.size()));
}

size_t chain_block_keys(BlockKey seed, const int64_t* tokens, size_t n_tokens,
                        size_t tokens_per_block, BlockKey* out) {
  if (tokens_per_block == 0) return 0;
  const size_t n_blocks = n_tokens / tokens_per_block;
  // One buffer holds the previous key followed by the block's tokens, so the
  // chained hash is a single XXH3 call per block. Token ids are packed as int32
  // when the whole block fits (every real vocabulary does): half the bytes to
  // hash. A block with a larger id is hashed as int64; the two forms differ in
  // length, so they never produce the same input.
  std::vector<unsigned char> buf(sizeof(BlockKey) + tokens_per_block * sizeof(int64_t));
  BlockKey prev = seed;
  for (size_t b = 0; b < n_blocks; ++b) {
    const int64_t* blk = tokens + b * tokens_per_block;
    std::memcpy(buf.data(), &prev, sizeof(BlockKey));
    int32_t* packed = reinterpret_cast<int32_t*>(buf.data() + sizeof(BlockKey));
    uint64_t out_of_range = 0;  // nonzero when some id is outside int32; kept branch-free to vectorize
    for (size_t i = 0; i < tokens_per_block; ++i) {
      out_of_range |= (static_cast<uint64_t>(blk[i]) + (uint64_t{1} << 31)) >> 32;
      packed[i] = static_cast<int32_t>(blk[i]);
    }
    const bool fits = out_of_range == 0;
    size_t len = sizeof(BlockKey) + tokens_per_block * sizeof(int32_t);
    if (!fits) {
      std::memcpy(buf.data() + sizeof(BlockKey), blk, tokens_per_block * sizeof(int64_t));
      len = sizeof(BlockKey) + tokens_per_block * sizeof(int64_t);
    }
    prev = from_xxh(XXH3_128bits(buf.data(), len));
    out[b] = prev;
  }
  return n_blocks;
}

}  // namespace flexkv
