// BlockPool: the free list of one tier's block ids 0..N-1.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace flexkv {

class BlockPool {
 public:
  explicit BlockPool(int32_t num_blocks);

  int32_t capacity() const { return capacity_; }
  size_t num_free() const { return free_.size(); }

  // Takes up to n free ids into out; returns how many it took.
  size_t allocate(size_t n, int32_t* out);
  // Returns ids to the free list. Each id must be allocated; a double free throws.
  void free(const int32_t* ids, size_t n);
  bool is_allocated(int32_t id) const { return allocated_[static_cast<size_t>(id)] != 0; }
  void reset();
  // Resets the pool with exactly the ids whose flag is nonzero allocated (flags has capacity() entries).
  void reset_allocated(const std::vector<uint8_t>& flags);

 private:
  int32_t capacity_;
  std::vector<int32_t> free_;
  std::vector<uint8_t> allocated_;
};

}  // namespace flexkv
