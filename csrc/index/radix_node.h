// The node of RadixIndex's tree, shared by the files that implement the index.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "index/radix_index.h"

namespace flexkv {

// A run of consecutive blocks of one sequence: keys[k] is block ids[k], at
// depth `depth + k`. Children continue the run's last block.
struct RadixIndex::Node {
  Node* parent = nullptr;
  BlockKey edge_key;  // the first key of this node's run: its key in parent->children
  std::vector<BlockKey> keys;
  std::vector<int32_t> ids;
  std::unordered_map<BlockKey, std::unique_ptr<Node>, BlockKeyHash> children;
  int64_t depth = 0;
  uint64_t last_access = 0;
  uint64_t serial = 0;  // creation order: breaks LRU ties the same way in every run (never an address)
  bool in_lru = false;
};

}  // namespace flexkv
