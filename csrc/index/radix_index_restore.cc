// RadixIndex: warm restart (restore) and the invariant check.
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "index/radix_index.h"
#include "index/radix_node.h"

namespace flexkv {

size_t RadixIndex::restore(const BlockKey* keys, const BlockKey* parents, const int64_t* positions,
                           const int32_t* ids, size_t n, std::vector<int32_t>* left_out) {
  std::lock_guard<std::mutex> g(mu_);
  if (!root_->children.empty() || pool_.num_free() != static_cast<size_t>(pool_.capacity())) {
    throw std::logic_error("RadixIndex::restore: the index must be empty");
  }
  const size_t cap = static_cast<size_t>(pool_.capacity());
  auto leave_out = [&](size_t e) {
    if (ids[e] >= 0 && static_cast<size_t>(ids[e]) < cap && left_out != nullptr) left_out->push_back(ids[e]);
  };
  // Keep the first entry of each key whose id is valid and unused.
  std::vector<uint8_t> used(cap, 0);
  std::unordered_map<BlockKey, size_t, BlockKeyHash> by_key;
  by_key.reserve(n);
  std::vector<uint8_t> kept(n, 0);
  for (size_t e = 0; e < n; ++e) {
    const bool id_ok = ids[e] >= 0 && static_cast<size_t>(ids[e]) < cap && !used[static_cast<size_t>(ids[e])];
    if (!id_ok || positions[e] < 0 || !by_key.emplace(keys[e], e).second) {
      leave_out(e);
      continue;
    }
    used[static_cast<size_t>(ids[e])] = 1;
    kept[e] = 1;
  }
  // Children of each kept entry, and the chain starts.
  std::unordered_map<BlockKey, std::vector<size_t>, BlockKeyHash> children;
  std::vector<size_t> roots;
  for (size_t e = 0; e < n; ++e) {
    if (!kept[e]) continue;
    if (positions[e] == 0) {
      roots.push_back(e);
    } else {
      children[parents[e]].push_back(e);
    }
  }
  // Depth-first from every start; an entry is placed right after its parent, found where it is now.
  std::vector<uint8_t> placed(n, 0);
  std::vector<size_t> stack(roots.rbegin(), roots.rend());
  size_t restored = 0;
  while (!stack.empty()) {
    const size_t e = stack.back();
    stack.pop_back();
    const int32_t id = ids[e];
    Cursor at{root_.get(), 0};
    if (positions[e] > 0) {
      const auto parent_id = static_cast<size_t>(by_key_.find(parents[e]));
      at = Cursor{node_of_[parent_id], offset_of_[parent_id] + size_t{1}};
    }
    append_run(at, &keys[e], &id, 1);
    ready_[static_cast<size_t>(id)] = 1;
    placed[e] = 1;
    ++restored;
    auto it = children.find(keys[e]);
    if (it == children.end()) continue;
    for (size_t child : it->second) {
      if (positions[child] == positions[e] + 1) stack.push_back(child);
    }
  }
  std::vector<uint8_t> allocated(cap, 0);
  for (size_t e = 0; e < n; ++e) {
    if (placed[e]) {
      allocated[static_cast<size_t>(ids[e])] = 1;
    } else if (kept[e]) {
      leave_out(e);  // its predecessor never made it into the tree
    }
  }
  pool_.reset_allocated(allocated);
  return restored;
}

void RadixIndex::check_consistency() const {
  std::lock_guard<std::mutex> g(mu_);
  auto fail = [](const std::string& what) { throw std::logic_error("RadixIndex inconsistent: " + what); };
  std::vector<uint8_t> seen(static_cast<size_t>(pool_.capacity()), 0);
  size_t in_tree = 0;
  size_t leaves = 0;
  int64_t nodes = 0;
  std::vector<const Node*> stack{root_.get()};
  while (!stack.empty()) {
    const Node* node = stack.back();
    stack.pop_back();
    if (node != root_.get()) {
      ++nodes;
      if (node->ids.empty()) fail("a node without blocks");
      if (node->keys.size() != node->ids.size()) fail("keys and ids differ in length");
      if (node->edge_key != node->keys.front()) fail("edge key differs from the first key");
      const bool leaf = node->children.empty();
      if (leaf != node->in_lru) fail("leaf set disagrees with the tree");
      leaves += leaf ? 1 : 0;
      const Node* p = node->parent;
      if (node->depth != p->depth + static_cast<int64_t>(p->keys.size())) fail("wrong node depth");
    }
    for (size_t k = 0; k < node->ids.size(); ++k) {
      const int32_t id = node->ids[k];
      if (id < 0 || id >= pool_.capacity()) fail("block id out of range");
      const auto uid = static_cast<size_t>(id);
      if (seen[uid]) fail("block " + std::to_string(id) + " appears twice");
      if (!pool_.is_allocated(id)) fail("block " + std::to_string(id) + " in the tree is free");
      if (node_of_[uid] != node || offset_of_[uid] != k) fail("block " + std::to_string(id) + " is misplaced");
      if (by_key_.find(node->keys[k]) != id) fail("key table disagrees for block " + std::to_string(id));
      seen[uid] = 1;
      ++in_tree;
    }
    for (const auto& kv : node->children) {
      if (kv.second->parent != node) fail("wrong parent pointer");
      if (!(kv.first == kv.second->edge_key)) fail("child stored under another key");
      stack.push_back(kv.second.get());
    }
  }
  if (in_tree + pool_.num_free() != static_cast<size_t>(pool_.capacity())) fail("blocks leaked");
  if (by_key_.size() != in_tree) fail("key table holds stale keys");
  if (leaves != lru_leaves_.size()) fail("leaf set has stale entries");
  if (nodes != num_nodes_) fail("node count");
  for (size_t id = 0; id < seen.size(); ++id) {
    if (locks_[id] < 0) fail("block " + std::to_string(id) + " has a negative lock count");
    if (!seen[id] && (ready_[id] || locks_[id] != 0 || node_of_[id] != nullptr)) {
      fail("free block " + std::to_string(id) + " has state");
    }
  }
}

}  // namespace flexkv
