// RadixIndex: the entry methods (keys looked up anywhere in the tree) and the
// per-block state (commit, release, ready flags, reset, statistics).
#include <stdexcept>
#include <string>

#include "index/radix_index.h"
#include "index/radix_node.h"

namespace flexkv {

int32_t RadixIndex::find(const BlockKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  return by_key_.find(key);
}

void RadixIndex::contains_each(const BlockKey* keys, size_t n, uint8_t* out_ready) const {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = by_key_.find(keys[i]);
    out_ready[i] = id >= 0 && ready_[static_cast<size_t>(id)] ? 1 : 0;
  }
}

size_t RadixIndex::acquire_each(const BlockKey* keys, size_t n, int32_t* out_ids) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = by_key_.find(keys[i]);
    if (id < 0 || !ready_[static_cast<size_t>(id)]) return i;
    ++locks_[static_cast<size_t>(id)];
    touch_node(node_of_[static_cast<size_t>(id)]);
    out_ids[i] = id;
  }
  return n;
}

size_t RadixIndex::reserve_each(const BlockKey* keys, size_t n, int32_t* out_ids, uint8_t* out_new) {
  std::lock_guard<std::mutex> g(mu_);
  ++clock_;
  for (size_t i = 0; i < n; ++i) {
    const int32_t id = by_key_.find(keys[i]);
    if (id >= 0) {
      const auto uid = static_cast<size_t>(id);
      touch_node(node_of_[uid]);
      if (ready_[uid] || locks_[uid] > 0) {
        out_new[i] = 0;
      } else {
        ++locks_[uid];
        out_new[i] = 1;
      }
      out_ids[i] = id;
      continue;
    }
    int32_t fresh = -1;
    if (allocate_locked(1, &fresh, -1) == 0) return i;
    locks_[static_cast<size_t>(fresh)] = 1;
    append_run(Cursor{root_.get(), 0}, keys + i, &fresh, 1);
    out_ids[i] = fresh;
    out_new[i] = 1;
  }
  return n;
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
  std::vector<std::unique_ptr<Node>> stack;
  for (auto& kv : root_->children) stack.push_back(std::move(kv.second));
  root_->children.clear();
  while (!stack.empty()) {  // without recursion: a deep tree must not overflow the stack
    std::unique_ptr<Node> node = std::move(stack.back());
    stack.pop_back();
    for (auto& kv : node->children) stack.push_back(std::move(kv.second));
    node->children.clear();
  }
  lru_leaves_.clear();
  pool_.reset();
  by_key_.clear();
  std::fill(ready_.begin(), ready_.end(), 0);
  std::fill(node_of_.begin(), node_of_.end(), nullptr);
  std::fill(offset_of_.begin(), offset_of_.end(), 0);
  num_nodes_ = 0;
  evicted_ = 0;
  if (listener_ != nullptr) listener_->on_cleared();
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

int64_t RadixIndex::depth(int32_t id) const {
  std::lock_guard<std::mutex> g(mu_);
  check_id(id);
  const Node* node = node_of_[static_cast<size_t>(id)];
  if (node == nullptr) throw std::logic_error("RadixIndex::depth: block " + std::to_string(id) + " is free");
  return node->depth + static_cast<int64_t>(offset_of_[static_cast<size_t>(id)]);
}

bool RadixIndex::parent_key(int32_t id, BlockKey* out) const {
  std::lock_guard<std::mutex> g(mu_);
  check_id(id);
  const Node* node = node_of_[static_cast<size_t>(id)];
  if (node == nullptr) throw std::logic_error("RadixIndex::parent_key: block " + std::to_string(id) + " is free");
  const uint32_t k = offset_of_[static_cast<size_t>(id)];
  if (k > 0) {
    *out = node->keys[k - 1];
    return true;
  }
  if (node->parent == root_.get()) return false;
  *out = node->parent->keys.back();
  return true;
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

}  // namespace flexkv
