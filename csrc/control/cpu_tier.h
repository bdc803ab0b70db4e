// CpuTier: the CPU tier's host blocks and their radix index.
//
// The blocks live in anonymous shared memory (memfd, pool/memfd_region.h)
// that engine worker processes of the same user map through the tier's
// socket (pool/region_share.h): nothing of it exists in /dev/shm or any other
// filesystem, and the kernel frees it when the owner and every mapper are
// gone, however they end (exit, crash, SIGKILL).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "index/radix_index.h"
#include "pool/memfd_region.h"
#include "pool/region_share.h"
#include "transfer/copy_layout.h"

namespace flexkv {

// What another process needs to map the CPU tier (map_shared_region): the
// socket that hands out its memory, and the geometry it must find there.
struct TierInfo {
  std::string socket;  // "@flexkv-cpu-<pid>-<random>", an abstract Unix socket
  int64_t num_blocks = 0;
  uint64_t block_stride = 0;
  uint64_t block_bytes = 0;
  uint64_t size = 0;  // bytes of the memory (num_blocks * block_stride, rounded up to huge pages)
  RegionGeometry geometry() const { return RegionGeometry{size, num_blocks, block_stride, block_bytes}; }
};

class CpuTier {
 public:
  // block_align: blocks start every round_up(block_bytes, block_align) bytes
  // (4096 when an SSD tier does direct I/O from them). Throws ConfigError
  // naming cache_config.num_cpu_blocks when the memory cannot be reserved.
  CpuTier(int64_t num_blocks, uint64_t block_bytes, uint64_t block_align, double evict_ratio, bool huge_pages);

  RadixIndex& index() { return index_; }
  const RadixIndex& index() const { return index_; }
  // The same before and after close() (after it, nothing answers at the socket).
  TierInfo info() const;
  int64_t num_blocks() const { return num_blocks_; }
  uint64_t block_bytes() const { return block_bytes_; }
  uint64_t block_stride() const { return block_stride_; }
  uint64_t base() const { return reinterpret_cast<uint64_t>(region_.data()); }
  // The bytes of the blocks (the memory may be larger: whole huge pages).
  uint64_t size() const { return static_cast<uint64_t>(num_blocks_) * block_stride_; }
  bool hugetlb() const { return region_.hugetlb(); }
  uint8_t* block(int32_t id) const { return region_.data() + static_cast<uint64_t>(id) * block_stride_; }
  HostRegion region() const { return HostRegion{base(), block_stride_, num_blocks_}; }
  // Stops handing the memory out and drops this tier's hold on it (mappings
  // others hold stay valid); the index stays. Nothing may copy to or from the
  // tier afterwards. Never waits for a mapper. Idempotent.
  void close();
  // Shares the mapping: it stays mapped while any holder lives (views handed out).
  std::shared_ptr<const void> mapping() const { return region_.mapping(); }
  // Connections the socket answered with the memory, and refused (another uid).
  uint64_t served() const { return server_->served(); }
  uint64_t refused() const { return server_->refused(); }

 private:
  int64_t num_blocks_;
  uint64_t block_bytes_;
  uint64_t block_stride_;
  MemfdRegion region_;
  uint64_t memory_bytes_;
  // Never reset, only stopped: info() and the counters may be read during close().
  std::unique_ptr<RegionServer> server_;
  RadixIndex index_;
};

}  // namespace flexkv
