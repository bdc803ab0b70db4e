// CpuTier: the CPU tier's host blocks, in one POSIX shared-memory segment that
// engine worker processes map by name, and its radix index.
//
// The segment is /flexkv-<pid namespace inode>-<pid>-<12 random hex>, owner
// only (0600). It is removed when the tier is destroyed; segments left by a
// killed process of the same PID namespace are removed by the next tier created
// there (containers that share /dev/shm but not PIDs never remove each other's).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "index/radix_index.h"
#include "pool/shm_region.h"
#include "transfer/copy_layout.h"

namespace flexkv {

class CpuTier {
 public:
  // block_align: blocks start every round_up(block_bytes, block_align) bytes
  // (4096 when an SSD tier does direct I/O from them).
  CpuTier(int64_t num_blocks, uint64_t block_bytes, uint64_t block_align, double evict_ratio, bool huge_pages);

  RadixIndex& index() { return index_; }
  const RadixIndex& index() const { return index_; }
  const std::string& shm_name() const { return shm_.name(); }
  int64_t num_blocks() const { return num_blocks_; }
  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t block_stride() const { return block_stride_; }
  uint64_t base() const { return reinterpret_cast<uint64_t>(shm_.data()); }
  uint64_t size() const { return static_cast<uint64_t>(num_blocks_) * block_stride_; }
  uint8_t* block(int32_t id) const { return shm_.data() + static_cast<uint64_t>(id) * block_stride_; }
  HostRegion region() const { return HostRegion{base(), block_stride_, num_blocks_}; }
  // Unmaps the blocks and removes the segment (mappings others hold stay valid);
  // the index stays. Nothing may copy to or from the tier afterwards.
  void close() { shm_.close(); }
  // Shares the mapping: it stays mapped while any holder lives (views handed out).
  std::shared_ptr<const void> mapping() const { return shm_.mapping(); }

 private:
  int64_t num_blocks_;
  uint64_t block_bytes_;
  uint64_t block_stride_;
  ShmRegion shm_;
  RadixIndex index_;
};

// Unlinks CPU-tier segments in shm_dir whose creating process (in this PID
// namespace) no longer exists; returns their names.
std::vector<std::string> remove_orphaned_segments(const std::string& shm_dir = "/dev/shm");

}  // namespace flexkv
