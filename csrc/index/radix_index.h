// RadixIndex: one tier's map from block-key chains to block ids.
//
// A path-compressed radix tree over block keys. Each block has a ready flag
// (its bytes are completely written) and a lock count (a task is reading or
// writing it). Eviction is LRU over leaves, takes blocks from the tail of a
// leaf only (so every cached block keeps its whole prefix), never takes a
// locked block, and frees `evict_ratio * capacity` blocks beyond what was asked
// so that eviction is not paid on every store. All methods are thread-safe.
//
// Two ways to address blocks, over one tree:
//  - chains: keys[0..n) hang off `parent` (nullptr: the root, i.e. the chain
//    starts a sequence). A key names its whole prefix, so chain methods walk
//    the tree from the parent.
//  - entries: each key is looked up wherever it is in the tree (a table from
//    key to block covers every block). Callers whose keys are already
//    whole-prefix hashes (SGLang's page hashes) use these; a new entry becomes
//    a chain of one block under the root.
// A block's depth is its position in its sequence (0 under the root).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "index/block_key.h"
#include "index/key_map.h"
#include "pool/block_pool.h"

namespace flexkv {

struct RadixIndexStats {
  int64_t capacity = 0;
  int64_t num_free = 0;
  int64_t num_cached = 0;   // blocks in the tree, ready or not
  int64_t num_locked = 0;   // blocks with a lock count above zero
  int64_t num_nodes = 0;
  int64_t evicted = 0;      // blocks evicted since construction or reset
};

// Told, under the index's lock, when ready blocks leave the index. It must not
// call back into the index.
class IndexListener {
 public:
  virtual ~IndexListener() = default;
  virtual void on_removed(const BlockKey* keys, size_t n) = 0;  // evicted (they were ready)
  virtual void on_cleared() = 0;                                // reset()
};

class RadixIndex {
 public:
  RadixIndex(int32_t num_blocks, double evict_ratio);
  ~RadixIndex();
  RadixIndex(const RadixIndex&) = delete;
  RadixIndex& operator=(const RadixIndex&) = delete;

  int32_t capacity() const { return pool_.capacity(); }
  // Set once, before use; nullptr for none.
  void set_listener(IndexListener* listener);
  // Whether a chain's reserve() may move a lone entry of one of its keys into
  // the chain (on by default). A tier whose stored blocks record their place
  // (the SSD tier's headers) turns it off: the chain then stops at that key.
  void set_relocation(bool allowed);

  // ------------------------------------------------------------------ chains
  // Number of leading keys whose blocks are ready. No side effects. A parent
  // that is not in the index matches nothing.
  size_t match(const BlockKey* keys, size_t n, const BlockKey* parent = nullptr) const;

  // Finds the leading ready keys, marks them recently used, locks those at
  // positions >= start and writes their ids to out_ids[0..]. Returns the number
  // of leading ready keys (so max(0, result - start) ids were written).
  size_t acquire(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids, const BlockKey* parent = nullptr);

  // Prepares a store of keys[start..n) of the chain keys[0..n). The keys before
  // `start` must already have blocks (ready, or being written by another store):
  // the caller has no bytes for them. For each key, in order:
  //  - a ready block, or one another store is writing: out_ids = its id, out_new = 0;
  //  - a block left unready by a failed store: locked, out_new = 1;
  //  - no block: one is allocated (evicting if the pool is empty), inserted
  //    unready and locked, out_new = 1.
  // Stops at the first key for which no block can be had (or, before `start`,
  // at the first key without a block) and returns the number of keys handled.
  // Every block with out_new = 1 must later be passed to commit() or release().
  // A parent that is not in the index handles nothing.
  size_t reserve(const BlockKey* keys, size_t n, size_t start, int32_t* out_ids, uint8_t* out_new,
                 const BlockKey* parent = nullptr);

  // Marks the leading present keys recently used (no lock, ready or not).
  // Returns how many it found.
  size_t touch(const BlockKey* keys, size_t n, const BlockKey* parent = nullptr);

  // ----------------------------------------------------------------- entries
  // out_ready[i] = 1 if keys[i] has a ready block anywhere in the tree.
  void contains_each(const BlockKey* keys, size_t n, uint8_t* out_ready) const;
  // Locks the leading entries with ready blocks; returns how many.
  size_t acquire_each(const BlockKey* keys, size_t n, int32_t* out_ids);
  // reserve() for each key on its own, in order: an existing block is handled
  // as reserve() handles it; a missing key gets a new block under the root.
  // Returns how many were handled (it stops where no block can be had).
  size_t reserve_each(const BlockKey* keys, size_t n, int32_t* out_ids, uint8_t* out_new);
  // The block of a key, or -1.
  int32_t find(const BlockKey& key) const;

  // -------------------------------------------------------------- block state
  // Marks blocks ready (their bytes are written) and unlocks them.
  void commit(const int32_t* ids, size_t n);
  // Unlocks blocks. Unready blocks stay in the tree, unreadable, until a later
  // reserve() rewrites them or eviction frees them.
  void release(const int32_t* ids, size_t n);
  // Sets the ready flag of locked blocks without unlocking them (a block
  // promoted from a slower tier that a load still holds), or clears it (a
  // block found corrupt: no match reaches it, and once unlocked a store may
  // rewrite it). Throws, changing nothing, if a block is not locked.
  void set_ready(const int32_t* ids, size_t n, bool ready);

  // Frees up to n unlocked blocks, least recently used leaves first, plus the
  // evict_ratio extra. Returns how many it freed.
  size_t evict(size_t n);

  // Drops every block. Throws if any block is locked.
  void reset();

  // Rebuilds an empty index from blocks read back from the tier's own storage
  // (warm restart). Entry i is block ids[i] holding keys[i], whose predecessor
  // in its sequence is parents[i] at positions[i] - 1 (position 0 hangs off the
  // root). Chains are restored from position 0 up, as ready blocks; an entry
  // whose predecessor is not restored, a repeated key or an id out of range or
  // seen before is left out and its id appended to `left_out` (when the id is
  // in range). Returns the number of blocks restored. Throws if the index is
  // not empty.
  size_t restore(const BlockKey* keys, const BlockKey* parents, const int64_t* positions, const int32_t* ids,
                 size_t n, std::vector<int32_t>* left_out);

  bool is_ready(int32_t id) const;
  int32_t lock_count(int32_t id) const;
  // The depth of a block in the tree (its position in its sequence).
  int64_t depth(int32_t id) const;
  // The key of the block before it in its sequence; false at depth 0.
  bool parent_key(int32_t id, BlockKey* out) const;
  RadixIndexStats stats() const;
  // Checks the tree's invariants (block ownership, leaf set, free list, key
  // table, depths); throws std::logic_error naming the first violation.
  void check_consistency() const;

 private:
  struct Node;
  // (last access, creation serial, node): eviction order is a function of the calls alone.
  using LruKey = std::tuple<uint64_t, uint64_t, const Node*>;
  // A place in the tree: after node->keys[j - 1] (j == 0 on the root: before everything).
  struct Cursor {
    Node* node;
    size_t j;
  };

  bool start_at(const BlockKey* parent, Cursor* at) const;
  Node* find_child(const Node* node, const BlockKey& key) const;
  void touch_node(Node* node);
  void lru_insert(Node* node);
  void lru_erase(Node* node);
  size_t evict_locked(size_t n);
  size_t allocate_locked(size_t n, int32_t* out, int32_t protect_id);
  Node* split(Node* node, size_t offset);
  void remove_leaf(Node* node);
  void place(Node* node, size_t from);  // records node/offset of node->ids[from..]
  Node* append_run(Cursor at, const BlockKey* keys, const int32_t* ids, size_t n);
  void check_id(int32_t id) const;
  void unlock_batch(const int32_t* ids, size_t n, const char* what);
  size_t reserve_locked(Cursor at, int32_t protect_id, const BlockKey* keys, size_t n, size_t start,
                        int32_t* out_ids, uint8_t* out_new);
  void forget_block(int32_t id, const BlockKey& key);

  mutable std::mutex mu_;
  BlockPool pool_;
  double evict_ratio_;
  std::unique_ptr<Node> root_;
  std::vector<uint8_t> ready_;
  std::vector<int32_t> locks_;
  std::vector<Node*> node_of_;     // per block id: the node holding it (null when free)
  std::vector<uint32_t> offset_of_;  // per block id: its index in that node's run
  KeyMap by_key_;
  std::set<LruKey> lru_leaves_;
  uint64_t clock_ = 0;
  uint64_t serials_ = 0;
  int64_t num_nodes_ = 0;
  int64_t evicted_ = 0;
  IndexListener* listener_ = nullptr;
  bool relocate_ = true;
};

}  // namespace flexkv
