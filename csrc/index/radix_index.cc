// RadixIndex: the tree, LRU leaves, eviction and the chain methods.
#include "index/radix_index.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "index/radix_node.h"

namespace flexkv {

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
  const auto n = static_cast<size_t>(num_blocks);
  ready_.assign(n, 0);
  locks_.assign(n, 0);
  node_of_.assign(n, nullptr);
  offset_of_.assign(n, 0);
}

RadixIndex::~RadixIndex() {
  for (auto& kv : root_->children) destroy_subtree(std::move(kv.second));
}

void RadixIndex::set_listener(IndexListener* listener) {
  std::lock_guard<std::mutex> g(mu_);
  listener_ = listener;
}

void RadixIndex::set_relocation(bool allowed) {
  std::lock_guard<std::mutex> g(mu_);
  relocate_ = allowed;
}

RadixIndex::Node* RadixIndex::find_child(const Node* node, const BlockKey& key) const {
  auto it = node->children.find(key);
  return it == node->children.end() ? nullptr : it->second.get();
}

void RadixIndex::lru_insert(Node* node) {
  if (node == root_.get() || node->in_lru || !node->children.empty()) return;
  lru_leaves_.emplace(node->last_access, node->serial, node);
  node->in_lru = true;
}

void RadixIndex::lru_erase(Node* node) {
  if (!node->in_lru) return;
  lru_leaves_.erase(LruKey{node->last_access, node->serial, node});
  node->in_lru = false;
}

void RadixIndex::touch_node(Node* node) {
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

void RadixIndex::place(Node* node, size_t from) {
  for (size_t k = from; k < node->ids.size(); ++k) {
    const auto uid = static_cast<size_t>(node->ids[k]);
    node_of_[uid] = node;
    offset_of_[uid] = static_cast<uint32_t>(k);
  }
}

bool RadixIndex::start_at(const BlockKey* parent, Cursor* at) const {
  if (parent == nullptr) {
    *at = Cursor{root_.get(), 0};
    return true;
  }
  const int32_t id = by_key_.find(*parent);
  if (id < 0) return false;
  *at = Cursor{node_of_[static_cast<size_t>(id)], offset_of_[static_cast<size_t>(id)] + size_t{1}};
  return true;
}

size_t RadixIndex::match(const BlockKey* keys, size_t n, const BlockKey* parent) const {
  std::lock_guard<std::mutex> g(mu_);
  Cursor c{};
  if (!start_at(parent, &c)) return 0;
  size_t i = 0;
  while (i < n) {
    if (c.j == c.node->keys.size()) {
      Node* child = find_child(c.node, keys[i]);
      if (child == nullptr) break;
      c = Cursor{child, 0};
    }
    if (c.node->keys[c.j] != keys[i] || !ready_[static_cast<size_t>(c.node->ids[c.j])]) break;
    ++i;
    ++c.j;
  }
  return i;
}

size_t RadixIndex::acquire(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids, const BlockKey* parent) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  Cursor c{};
  if (!start_at(parent, &c)) return 0;
  size_t i = 0;
  Node* touched = nullptr;
  while (i < n) {
    if (c.j == c.node->keys.size()) {
      Node* child = find_child(c.node, keys[i]);
      if (child == nullptr) break;
      c = Cursor{child, 0};
    }
    if (c.node->keys[c.j] != keys[i]) break;
    const int32_t id = c.node->ids[c.j];
    if (!ready_[static_cast<size_t>(id)]) break;
    if (c.node != touched) {
      touch_node(c.node);
      touched = c.node;
    }
    if (i >= start) {
      ++locks_[static_cast<size_t>(id)];
      out_ids[i - start] = id;
    }
    ++i;
    ++c.j;
  }
  return i;
}

size_t RadixIndex::touch(const BlockKey* keys, size_t n, const BlockKey* parent) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  Cursor c{};
  if (!start_at(parent, &c)) return 0;
  size_t i = 0;
  Node* touched = nullptr;
  while (i < n) {
    if (c.j == c.node->keys.size()) {
      Node* child = find_child(c.node, keys[i]);
      if (child == nullptr) break;
      c = Cursor{child, 0};
    }
    if (c.node->keys[c.j] != keys[i]) break;
    if (c.node != touched) {
      touch_node(c.node);
      touched = c.node;
    }
    ++i;
    ++c.j;
  }
  return i;
}

RadixIndex::Node* RadixIndex::split(Node* node, size_t offset) {
  auto tail = std::make_unique<Node>();
  Node* t = tail.get();
  t->serial = ++serials_;
  t->parent = node;
  t->edge_key = node->keys[offset];
  t->depth = node->depth + static_cast<int64_t>(offset);
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
  place(t, 0);
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

void RadixIndex::forget_block(int32_t id, const BlockKey& key) {
  const auto uid = static_cast<size_t>(id);
  by_key_.erase(key);
  node_of_[uid] = nullptr;
  offset_of_[uid] = 0;
  ready_[uid] = 0;
}

size_t RadixIndex::evict_locked(size_t n) {
  if (n == 0) return 0;
  const size_t extra = static_cast<size_t>(std::ceil(evict_ratio_ * pool_.capacity()));
  const size_t target = n + extra;
  std::vector<int32_t> freed;
  std::vector<BlockKey> removed;  // the ready ones, for the listener
  std::vector<Node*> skipped;
  while (freed.size() < target && !lru_leaves_.empty()) {
    Node* leaf = const_cast<Node*>(std::get<2>(*lru_leaves_.begin()));
    while (!leaf->ids.empty() && freed.size() < target) {
      const int32_t id = leaf->ids.back();
      if (locks_[static_cast<size_t>(id)] > 0) break;
      if (ready_[static_cast<size_t>(id)] && listener_ != nullptr) removed.push_back(leaf->keys.back());
      forget_block(id, leaf->keys.back());
      leaf->ids.pop_back();
      leaf->keys.pop_back();
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
  if (!removed.empty()) listener_->on_removed(removed.data(), removed.size());
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

RadixIndex::Node* RadixIndex::append_run(Cursor at, const BlockKey* keys, const int32_t* ids, size_t n) {
  Node* node = at.node;
  if (at.j < node->keys.size()) split(node, at.j);
  for (size_t k = 0; k < n; ++k) {
    const auto uid = static_cast<size_t>(ids[k]);
    by_key_.insert(keys[k], ids[k]);
    ready_[uid] = 0;
  }
  if (node != root_.get() && node->children.empty()) {
    // Extend a leaf in place rather than hanging a one-child chain off it.
    const size_t from = node->ids.size();
    node->keys.insert(node->keys.end(), keys, keys + n);
    node->ids.insert(node->ids.end(), ids, ids + n);
    place(node, from);
    touch_node(node);
    return node;
  }
  auto child = std::make_unique<Node>();
  Node* c = child.get();
  c->serial = ++serials_;
  c->parent = node;
  c->edge_key = keys[0];
  c->depth = node->depth + static_cast<int64_t>(node->keys.size());
  c->keys.assign(keys, keys + n);
  c->ids.assign(ids, ids + n);
  c->last_access = clock_;
  lru_erase(node);
  node->children.emplace(c->edge_key, std::move(child));
  ++num_nodes_;
  place(c, 0);
  lru_insert(c);
  return c;
}

size_t RadixIndex::reserve(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids, uint8_t* out_new,
                           const BlockKey* parent) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  Cursor c{};
  if (!start_at(parent, &c)) return 0;
  const int32_t protect = parent == nullptr ? -1 : by_key_.find(*parent);
  return reserve_locked(c, protect, keys, n, start, out_ids, out_new);
}

size_t RadixIndex::reserve_locked(Cursor c, int32_t protect_id, const BlockKey* keys, size_t n, size_t start,
                                  int32_t* out_ids, uint8_t* out_new) {
  size_t i = 0;
  int32_t last_id = protect_id;
  Node* touched = nullptr;
  while (i < n) {
    if (c.j == c.node->keys.size()) {
      Node* child = find_child(c.node, keys[i]);
      if (child == nullptr) break;
      c = Cursor{child, 0};
    }
    if (c.node->keys[c.j] != keys[i]) break;
    if (c.node != touched) {
      touch_node(c.node);
      touched = c.node;
    }
    const int32_t id = c.node->ids[c.j];
    const auto uid = static_cast<size_t>(id);
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
    ++c.j;
  }
  // The chain leaves the tree at c: the rest needs blocks placed after c, new
  // ones for keys the index does not know.
  while (i < n) {
    size_t end = i;
    while (end < n && by_key_.find(keys[end]) < 0) ++end;
    if (end > i) {
      if (i < start) return i;  // the caller has no bytes for keys before start
      // Allocate first (eviction may shorten c.node past c.j, but never below
      // its protected block c.j - 1), then hang the new blocks at c.
      const size_t want = end - i;
      std::vector<int32_t> ids(want);
      const size_t got = allocate_locked(want, ids.data(), last_id);
      if (got == 0) return i;
      for (size_t k = 0; k < got; ++k) {
        locks_[static_cast<size_t>(ids[k])] = 1;
        out_ids[i + k] = ids[k];
        out_new[i + k] = 1;
      }
      append_run(c, keys + i, ids.data(), got);
      i += got;
      last_id = ids[got - 1];
      if (got < want) return i;
    } else {
      // keys[i] has a block elsewhere. A key lives in one place only: a lone
      // unlocked entry under the root (stored before its prefix was known) moves
      // here with its bytes; anything else ends the chain.
      const int32_t id = by_key_.find(keys[i]);
      const auto uid = static_cast<size_t>(id);
      Node* lone = node_of_[uid];
      if (!relocate_ || lone->parent != root_.get() || lone->ids.size() != 1 || !lone->children.empty() ||
          locks_[uid] > 0) {
        return i;
      }
      const bool was_ready = ready_[uid] != 0;
      if (i < start && !was_ready) return i;
      lru_erase(lone);
      root_->children.erase(lone->edge_key);  // destroys the node, not the block
      --num_nodes_;
      by_key_.erase(keys[i]);
      append_run(c, keys + i, &id, 1);
      ready_[uid] = was_ready ? 1 : 0;
      if (was_ready) {
        out_new[i] = 0;
      } else {
        locks_[uid] = 1;
        out_new[i] = 1;
      }
      out_ids[i] = id;
      last_id = id;
      ++i;
    }
    c = Cursor{node_of_[static_cast<size_t>(last_id)], offset_of_[static_cast<size_t>(last_id)] + size_t{1}};
  }
  return i;
}

}  // namespace flexkv
