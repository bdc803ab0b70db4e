// KeyMap: block key -> block id, an open-addressing table with linear probing
// and backward-shift deletion (no tombstones). Keys are already uniform hashes,
// so one multiply spreads them. Grows by doubling at half load; never shrinks
// (reset() keeps the table). Not thread-safe: the index's mutex guards it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "index/block_key.h"

namespace flexkv {

class KeyMap {
 public:
  KeyMap() { slots_.resize(kInitial); }

  // The id stored under `key`, or -1.
  int32_t find(const BlockKey& key) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = home(key, mask);; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (s.id < 0) return -1;
      if (s.key == key) return s.id;
    }
  }

  // Stores key -> id; the key must not be present.
  void insert(const BlockKey& key, int32_t id) {
    if ((size_ + 1) * 2 > slots_.size()) grow();
    place(key, id);
    ++size_;
  }

  // Removes the key if present.
  void erase(const BlockKey& key) {
    const size_t mask = slots_.size() - 1;
    size_t i = home(key, mask);
    for (;; i = (i + 1) & mask) {
      if (slots_[i].id < 0) return;
      if (slots_[i].key == key) break;
    }
    // Backward shift: move later members of the probe run into the hole.
    size_t hole = i;
    for (size_t j = (i + 1) & mask; slots_[j].id >= 0; j = (j + 1) & mask) {
      const size_t want = home(slots_[j].key, mask);
      // j may move into the hole when its home is not cyclically within (hole, j].
      const bool movable = hole <= j ? (want <= hole || want > j) : (want <= hole && want > j);
      if (movable) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = Slot{};
    --size_;
  }

  void clear() {
    for (Slot& s : slots_) s = Slot{};
    size_ = 0;
  }

  size_t size() const { return size_; }

 private:
  static constexpr size_t kInitial = 64;
  struct Slot {
    BlockKey key;
    int32_t id = -1;
  };

  static size_t home(const BlockKey& key, size_t mask) {
    return static_cast<size_t>(((key.lo ^ key.hi) * 0x9E3779B97F4A7C15ull) >> 17) & mask;
  }

  void place(const BlockKey& key, int32_t id) {
    const size_t mask = slots_.size() - 1;
    size_t i = home(key, mask);
    while (slots_[i].id >= 0) i = (i + 1) & mask;
    slots_[i] = Slot{key, id};
  }

  void grow() {
    std::vector<Slot> old(slots_.size() * 2);
    old.swap(slots_);
    for (const Slot& s : old) {
      if (s.id >= 0) place(s.key, s.id);
    }
  }

  std::vector<Slot> slots_;
  size_t size_ = 0;
};

}  // namespace flexkv
