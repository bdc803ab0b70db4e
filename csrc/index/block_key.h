// Block keys: 128-bit content hashes chained over the token blocks of a sequence.
//
// key[-1] = H(namespace); key[i] = H(key[i-1] || token ids of block i).
// Two sequences share key[i] only if they share the namespace and every token of
// blocks 0..i, so a key names a whole prefix, not one block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

namespace flexkv {

struct BlockKey {
  uint64_t lo = 0;
  uint64_t hi = 0;

  bool operator==(const BlockKey& o) const { return lo == o.lo && hi == o.hi; }
  bool operator!=(const BlockKey& o) const { return !(*this == o); }
};

struct BlockKeyHash {
  size_t operator()(const BlockKey& k) const noexcept { return static_cast<size_t>(k.lo ^ (k.hi >> 1)); }
};

// The seed of every chain in a namespace (model, KV layout fingerprint, user salt).
BlockKey namespace_key(std::string_view ns);

// Writes the keys of the n_tokens / tokens_per_block whole blocks of `tokens`
// to `out` and returns how many it wrote. A trailing partial block has no key.
size_t chain_block_keys(BlockKey seed, const int64_t* tokens, size_t n_tokens,
                        size_t tokens_per_block, BlockKey* out);

}  // namespace flexkv
