// KeyRun: the blocks one request names, and what the slower tiers' block
// headers record of each (parent key, position in the sequence, token ids).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "index/block_key.h"

namespace flexkv {

struct KeyRun {
  enum class Shape {
    kChain,    // keys[0..n) continue `parent` (the root when has_parent is false)
    kEntries,  // each key names its block on its own (page hashes); looked up anywhere
  };
  Shape shape = Shape::kChain;
  BlockKey seed;                 // the namespace seed: the header parent of position 0 and of entries
  bool has_parent = false;       // a chain that continues an existing block
  BlockKey parent;               // that block's key
  int64_t first_position = 0;    // a chain's position of keys[0] in its sequence
  int tokens_per_block = 0;
  std::vector<BlockKey> keys;
  std::vector<int64_t> tokens;   // keys.size() * tokens_per_block ids, or empty (headers then hold zeros)

  size_t size() const { return keys.size(); }
  bool chain() const { return shape == Shape::kChain; }
  // The parent argument of the index's chain methods.
  const BlockKey* index_parent() const { return has_parent ? &parent : nullptr; }
  // What block i's header records.
  BlockKey parent_of(size_t i) const {
    if (!chain()) return seed;
    if (i > 0) return keys[i - 1];
    return has_parent ? parent : seed;
  }
  int64_t position_of(size_t i) const { return chain() ? first_position + static_cast<int64_t>(i) : 0; }
  // Block i's token ids (tokens_per_block of them), or null when the run carries none.
  const int64_t* tokens_of(size_t i) const {
    return tokens.empty() ? nullptr : tokens.data() + i * static_cast<size_t>(tokens_per_block);
  }
};

}  // namespace flexkv
