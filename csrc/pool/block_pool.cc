#include "pool/block_pool.h"

#include <stdexcept>
#include <string>

namespace flexkv {

BlockPool::BlockPool(int32_t num_blocks) : capacity_(num_blocks) {
  if (num_blocks < 0) throw std::invalid_argument("BlockPool: num_blocks must be >= 0");
  reset();
}

void BlockPool::reset() {
  free_.resize(static_cast<size_t>(capacity_));
  // Ids come out in ascending order, which keeps a fresh pool's copies sequential.
  for (int32_t i = 0; i < capacity_; ++i) free_[static_cast<size_t>(i)] = capacity_ - 1 - i;
  allocated_.assign(static_cast<size_t>(capacity_), 0);
}

void BlockPool::reset_allocated(const std::vector<uint8_t>& flags) {
  if (flags.size() != static_cast<size_t>(capacity_)) {
    throw std::invalid_argument("BlockPool::reset_allocated: expected " + std::to_string(capacity_) + " flags");
  }
  free_.clear();
  for (int32_t i = capacity_ - 1; i >= 0; --i) {
    if (!flags[static_cast<size_t>(i)]) free_.push_back(i);
  }
  allocated_.assign(flags.begin(), flags.end());
  for (auto& a : allocated_) a = a ? 1 : 0;
}

size_t BlockPool::allocate(size_t n, int32_t* out) {
  size_t got = n < free_.size() ? n : free_.size();
  for (size_t i = 0; i < got; ++i) {
    int32_t id = free_.back();
    free_.pop_back();
    allocated_[static_cast<size_t>(id)] = 1;
    out[i] = id;
  }
  return got;
}

void BlockPool::free(const int32_t* ids, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    int32_t id = ids[i];
    if (id < 0 || id >= capacity_) {
      throw std::out_of_range("BlockPool::free: block id " + std::to_string(id) + " outside [0, " +
                              std::to_string(capacity_) + ")");
    }
    if (!allocated_[static_cast<size_t>(id)]) {
      throw std::logic_error("BlockPool::free: block " + std::to_string(id) + " is already free");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    allocated_[static_cast<size_t>(ids[i])] = 0;
    free_.push_back(ids[i]);
  }
}

}  // namespace flexkv
