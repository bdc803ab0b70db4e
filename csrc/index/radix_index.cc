#include "index/radix_index.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace flexkv {

struct RadixIndex::Node {
  Node* parent = nullptr;
  BlockKey edge_key;  // the first key of this node's run: its key in parent->children
  std::vector<BlockKey> keys;
  std::vector<int32_t> ids;
  std::unordered_map<BlockKey, std::unique_ptr<Node>, BlockKeyHash> children;
  uint64_t last_access = 0;
  bool in_lru = false;
};

namespace {

// Destroys a subtree without recursion, so a deep tree cannot overflow the stack.
template <typename NodeT>
void destroy_subtree(std::unique_ptr<NodeT> root) {
  std::vector<std::unique_ptr<NodeT>> stack;
  stack.push_back(std::move(root));
  while (!stack.empty()) {
    std::unique_ptr<NodeT> n = std::move(stack.back());
    stack.pop_back();
    for (auto& kv : n->children) stack.push_back(std::move(kv.second));
    n->children.clear();
  }
}

}  // namespace

RadixIndex::RadixIndex(int32_t num_blocks, double evict_ratio)
    : pool_(num_blocks), evict_ratio_(evict_ratio), root_(std::make_unique<Node>()) {
  if (!(evict_ratio >= 0.0 && evict_ratio <= 1.0)) {
    throw std::invalid_argument("RadixIndex: evict_ratio must be within [0, 1], got " +
                                std::to_string(evict_ratio));
  }
  ready_.assign(static_cast<size_t>(num_blocks), 0);
  locks_.assign(static_cast<size_t>(num_blocks), 0);
}

RadixIndex::~RadixIndex() { destroy_subtree(std::move(root_)); }

RadixIndex::Node* RadixIndex::find_child(const Node* node, const BlockKey& key) const {
  auto it = node->children.find(key);
  return it == node->children.end() ? nullptr : it->second.get();
}

void RadixIndex::lru_insert(Node* node) {
  if (node == root_.get() || node->in_lru || !node->children.empty()) return;
  lru_leaves_.emplace(node->last_access, node);
  node->in_lru = true;
}

void RadixIndex::lru_erase(Node* node) {
  if (!node->in_lru) return;
  lru_leaves_.erase(LruKey{node->last_access, node});
  node->in_lru = false;
}

void RadixIndex::touch(Node* node) {
  if (node->in_lru) {
    lru_erase(node);
    node->last_access = clock_;
    lru_insert(node);
  } else {
    node->last_access = clock_;
  }
}

void RadixIndex::check_id(int32_t id) const {
  if (id < 0 || id >= pool_.capacity()) {
    throw std::out_of_range("block id " + std::to_string(id) + " outside [0, " +
                            std::to_string(pool_.capacity()) + ")");
  }
}

size_t RadixIndex::match(const BlockKey* keys, size_t n) const {
  std::lock_guard<std::mutex> g(mu_);
  const Node* node = root_.get();
  size_t i = 0;
  while (i < n) {
    const Node* child = find_child(node, keys[i]);
    if (child == nullptr) break;
    size_t j = 0;
    const size_t len = child->keys.size();
    while (j < len && i < n && child->keys[j] == keys[i]) {
      if (!ready_[static_cast<size_t>(child->ids[j])]) return i;
      ++i;
      ++j;
    }
    if (j < len) break;
    node = child;
  }
  return i;
}

void RadixIndex::contains_each(const BlockKey* keys, size_t n, uint8_t* out_ready) const {
  for (size_t i = 0; i < n; ++i) out_ready[i] = match(keys + i, 1) == 1 ? 1 : 0;
}

size_t RadixIndex::acquire_each(const BlockKey* keys, size_t n, int32_t* out_ids) {
  for (size_t i = 0; i < n; ++i) {
    if (acquire(keys + i, 1, 0, out_ids + i) != 1) return i;
  }
  return n;
}

size_t RadixIndex::reserve_each(const BlockKey* keys, size_t n, int32_t* out_ids, uint8_t* out_new) {
  for (size_t i = 0; i < n; ++i) {
    if (reserve(keys + i, 1, 0, out_ids + i, out_new + i) != 1) return i;
  }
  return n;
}

size_t RadixIndex::acquire(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  Node* node = root_.get();
  size_t i = 0;
  bool stop = false;
  while (i < n && !stop) {
    Node* child = find_child(node, keys[i]);
    if (child == nullptr) break;
    size_t j = 0;
    const size_t len = child->keys.size();
    while (j < len && i < n && child->keys[j] == keys[i]) {
      const int32_t id = child->ids[j];
      if (!ready_[static_cast<size_t>(id)]) {
        stop = true;
        break;
      }
      if (i >= start) {
        ++locks_[static_cast<size_t>(id)];
        out_ids[i - start] = id;
      }
      ++i;
      ++j;
    }
    if (j > 0) touch(child);
    if (j < len) break;
    node = child;
  }
  return i;
}

RadixIndex::Node* RadixIndex::split(Node* node, size_t offset) {
  auto tail = std::make_unique<Node>();
  Node* t = tail.get();
  t->parent = node;
  t->edge_key = node->keys[offset];
  t->keys.assign(node->keys.begin() + static_cast<std::ptrdiff_t>(offset), node->keys.end());
  t->ids.assign(node->ids.begin() + static_cast<std::ptrdiff_t>(offset), node->ids.end());
  t->children = std::move(node->children);
  node->children.clear();
  for (auto& kv : t->children) kv.second->parent = t;
  t->last_access = node->last_access;
  node->keys.resize(offset);
  node->ids.resize(offset);
  const bool was_leaf = node->in_lru;
  lru_erase(node);
  node->children.emplace(t->edge_key, std::move(tail));
  ++num_nodes_;
  if (was_leaf) lru_insert(t);
  return t;
}

void RadixIndex::remove_leaf(Node* node) {
  Node* parent = node->parent;
  lru_erase(node);
  parent->children.erase(node->edge_key);  // destroys node
  --num_nodes_;
  lru_insert(parent);
}

size_t RadixIndex::evict_locked(size_t n) {
  if (n == 0) return 0;
  const size_t extra = static_cast<size_t>(std::ceil(evict_ratio_ * pool_.capacity()));
  const size_t target = n + extra;
  std::vector<int32_t> freed;
  std::vector<Node*> skipped;
  while (freed.size() < target && !lru_leaves_.empty()) {
    Node* leaf = const_cast<Node*>(lru_leaves_.begin()->second);
    while (!leaf->ids.empty() && freed.size() < target) {
      const int32_t id = leaf->ids.back();
      if (locks_[static_cast<size_t>(id)] > 0) break;
      leaf->ids.pop_back();
      leaf->keys.pop_back();
      ready_[static_cast<size_t>(id)] = 0;
      freed.push_back(id);
    }
    if (leaf->ids.empty()) {
      remove_leaf(leaf);
    } else if (freed.size() < target) {
      lru_erase(leaf);  // its tail is locked: leave it for this round
      skipped.push_back(leaf);
    }
  }
  for (Node* leaf : skipped) lru_insert(leaf);
  pool_.free(freed.data(), freed.size());
  evicted_ += static_cast<int64_t>(freed.size());
  return freed.size();
}

size_t RadixIndex::evict(size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  return evict_locked(n);
}

size_t RadixIndex::allocate_locked(size_t n, int32_t* out, int32_t protect_id) {
  size_t got = pool_.allocate(n, out);
  if (got < n) {
    if (protect_id >= 0) ++locks_[static_cast<size_t>(protect_id)];
    evict_locked(n - got);
    if (protect_id >= 0) --locks_[static_cast<size_t>(protect_id)];
    got += pool_.allocate(n - got, out + got);
  }
  return got;
}

size_t RadixIndex::reserve(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids, uint8_t* out_new) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  Node* node = root_.get();
  size_t j = 0;  // keys of `node` matched so far
  size_t i = 0;
  int32_t last_id = -1;
  while (i < n) {
    if (j == node->keys.size()) {
      Node* child = find_child(node, keys[i]);
      if (child == nullptr) break;
      node = child;
      j = 0;
      touch(node);
      continue;
    }
    if (node->keys[j] != keys[i]) break;
    const int32_t id = node->ids[j];
    const size_t uid = static_cast<size_t>(id);
    if (ready_[uid] || locks_[uid] > 0) {
      out_new[i] = 0;
    } else if (i < start) {
      return i;  // unreadable, and the caller has no bytes to rewrite it
    } else {
      ++locks_[uid];
      out_new[i] = 1;
    }
    out_ids[i] = id;
    last_id = id;
    ++i;
    ++j;
  }
  if (i == n || i < start) return i;

  // The chain leaves the tree at (node, j): the rest needs new blocks. Allocate
  // first (eviction may shorten `node` past j, but never below its protected
  // block j-1), then split only if something is left to hang the new blocks off.
  const size_t want = n - i;
  std::vector<int32_t> ids(want);
  const size_t got = allocate_locked(want, ids.data(), last_id);
  if (got == 0) return i;
  if (j < node->keys.size()) split(node, j);
  for (size_t k = 0; k < got; ++k) {
    const size_t uid = static_cast<size_t>(ids[k]);
    ready_[uid] = 0;
    locks_[uid] = 1;
    out_ids[i + k] = ids[k];
    out_new[i + k] = 1;
  }
  if (node != root_.get() && node->children.empty()) {
    // Extend a leaf in place rather than hanging a one-child chain off it.
    node->keys.insert(node->keys.end(), keys + i, keys + i + got);
    node->ids.insert(node->ids.end(), ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(got));
    touch(node);
  } else {
    auto child = std::make_unique<Node>();
    Node* c = child.get();
    c->parent = node;
    c->edge_key = keys[i];
    c->keys.assign(keys + i, keys + i + got);
    c->ids.assign(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(got));
    c->last_access = clock_;
    lru_erase(node);
    node->children.emplace(c->edge_key, std::move(child));
    ++num_nodes_;
    lru_insert(c);
  }
  return i + got;
}

void RadixIndex::unlock_batch(const int32_t* ids, size_t n, const char* what) {
  for (size_t k = 0; k < n; ++k) {
    const int32_t id = ids[k];
    if (id < 0 || id >= pool_.capacity() || locks_[static_cast<size_t>(id)] <= 0) {
      // Undo this batch so a bad or repeated id leaves every lock count as it was.
      for (size_t u = 0; u < k; ++u) ++locks_[static_cast<size_t>(ids[u])];
      check_id(id);
      throw std::logic_error(std::string("RadixIndex::") + what + ": block " + std::to_string(id) +
                             " is not locked (or is listed more often than it is locked)");
    }
    --locks_[static_cast<size_t>(id)];
  }
}

void RadixIndex::commit(const int32_t* ids, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  unlock_batch(ids, n, "commit");
  for (size_t k = 0; k < n; ++k) ready_[static_cast<size_t>(ids[k])] = 1;
}

void RadixIndex::release(const int32_t* ids, size_t n) {
  std::lock_guard<std::mutex> g(mu_);
  unlock_batch(ids, n, "release");
}

void RadixIndex::set_ready(const int32_t* ids, size_t n, bool ready) {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t k = 0; k < n; ++k) {
    check_id(ids[k]);
    if (locks_[static_cast<size_t>(ids[k])] <= 0) {
      throw std::logic_error("RadixIndex::set_ready: block " + std::to_string(ids[k]) + " is not locked");
    }
  }
  for (size_t k = 0; k < n; ++k) ready_[static_cast<size_t>(ids[k])] = ready ? 1 : 0;
}

void RadixIndex::reset() {
  std::lock_guard<std::mutex> g(mu_);
  for (int32_t l : locks_) {
    if (l > 0) throw std::logic_error("RadixIndex::reset: blocks are locked by running tasks");
  }
  for (auto& kv : root_->children) destroy_subtree(std::move(kv.second));
  root_->children.clear();
  lru_leaves_.clear();
  pool_.reset();
  std::fill(ready_.begin(), ready_.end(), 0);
  num_nodes_ = 0;
  evicted_ = 0;
}

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
  // Depth-first from every start; an entry is placed right after its parent's place in the tree.
  std::vector<uint8_t> placed(n, 0);
  struct Frame {
    size_t entry;
    Node* node;     // where the entry's parent sits (root_ for position 0)
    size_t offset;  // the parent's index in node->keys + 1 (0 for root_)
  };
  std::vector<Frame> stack;
  for (size_t r : roots) stack.push_back({r, root_.get(), 0});
  size_t restored = 0;
  while (!stack.empty()) {
    Frame f = stack.back();
    stack.pop_back();
    const size_t e = f.entry;
    Node* node = f.node;
    size_t j = f.offset;
    if (j < node->keys.size()) {
      node = split(node, j)->parent;  // the new block becomes a sibling of the split-off tail
    }
    Node* at;
    size_t at_offset;
    if (node != root_.get() && node->children.empty() && j == node->keys.size()) {
      node->keys.push_back(keys[e]);
      node->ids.push_back(ids[e]);
      at = node;
      at_offset = node->keys.size();
    } else {
      auto child = std::make_unique<Node>();
      Node* c = child.get();
      c->parent = node;
      c->edge_key = keys[e];
      c->keys.push_back(keys[e]);
      c->ids.push_back(ids[e]);
      lru_erase(node);
      node->children.emplace(keys[e], std::move(child));
      ++num_nodes_;
      lru_insert(c);
      at = c;
      at_offset = 1;
    }
    ready_[static_cast<size_t>(ids[e])] = 1;
    placed[e] = 1;
    ++restored;
    auto it = children.find(keys[e]);
    if (it == children.end()) continue;
    for (size_t child : it->second) {
      if (positions[child] == positions[e] + 1) stack.push_back({child, at, at_offset});
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

bool RadixIndex::is_ready(int32_t id) const {
  std::lock_guard<std::mutex> g(mu_);
  check_id(id);
  return ready_[static_cast<size_t>(id)] != 0;
}

int32_t RadixIndex::lock_count(int32_t id) const {
  std::lock_guard<std::mutex> g(mu_);
  check_id(id);
  return locks_[static_cast<size_t>(id)];
}

RadixIndexStats RadixIndex::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  RadixIndexStats s;
  s.capacity = pool_.capacity();
  s.num_free = static_cast<int64_t>(pool_.num_free());
  s.num_cached = s.capacity - s.num_free;
  for (int32_t l : locks_) s.num_locked += l > 0 ? 1 : 0;
  s.num_nodes = num_nodes_;
  s.evicted = evicted_;
  return s;
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
    }
    for (int32_t id : node->ids) {
      if (id < 0 || id >= pool_.capacity()) fail("block id out of range");
      if (seen[static_cast<size_t>(id)]) fail("block " + std::to_string(id) + " appears twice");
      if (!pool_.is_allocated(id)) fail("block " + std::to_string(id) + " in the tree is free");
      seen[static_cast<size_t>(id)] = 1;
      ++in_tree;
    }
    for (const auto& kv : node->children) {
      if (kv.second->parent != node) fail("wrong parent pointer");
      if (!(kv.first == kv.second->edge_key)) fail("child stored under another key");
      stack.push_back(kv.second.get());
    }
  }
  if (in_tree + pool_.num_free() != static_cast<size_t>(pool_.capacity())) fail("blocks leaked");
  if (leaves != lru_leaves_.size()) fail("leaf set has stale entries");
  if (nodes != num_nodes_) fail("node count");
  for (size_t id = 0; id < seen.size(); ++id) {
    if (locks_[id] < 0) fail("block " + std::to_string(id) + " has a negative lock count");
    if (!seen[id] && (ready_[id] || locks_[id] != 0)) fail("free block " + std::to_string(id) + " has state");
  }
}

}  // namespace flexkv
