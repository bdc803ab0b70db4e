#include "control/cpu_tier.h"

#include "control/log.h"
#include "flexkv/errors.h"

namespace flexkv {
namespace {

uint64_t round_up(uint64_t v, uint64_t align) { return align <= 1 ? v : (v + align - 1) / align * align; }

MemfdRegion make_memory(int64_t num_blocks, uint64_t stride, bool huge_pages) {
  const uint64_t bytes = static_cast<uint64_t>(num_blocks) * stride;
  std::string note;
  try {
    MemfdRegion r = MemfdRegion::create("flexkv-cpu-tier", bytes, huge_pages, &note);
    if (!note.empty()) log_line(LogLevel::kInfo, "FlexKV CPU tier: use_hugepage_cpu_buffer: " + note);
    r.prefault_in_background();
    return r;
  } catch (const std::exception& e) {
    throw ConfigError("cache_config.num_cpu_blocks: the CPU tier (" + std::to_string(num_blocks) + " blocks x " +
                          std::to_string(stride) + " bytes) cannot be reserved: " + e.what() +
                          "; lower num_cpu_blocks (or cpu_cache_gb) or free memory",
                      "cache_config.num_cpu_blocks");
  }
}

}  // namespace

CpuTier::CpuTier(int64_t num_blocks, uint64_t block_bytes, uint64_t block_align, double evict_ratio, bool huge_pages)
    : num_blocks_(num_blocks),
      block_bytes_(block_bytes),
      block_stride_(round_up(block_bytes, block_align)),
      region_(make_memory(num_blocks, block_stride_, huge_pages)),
      memory_bytes_(region_.size()),
      server_(std::make_unique<RegionServer>(
          region_.fd(), RegionGeometry{memory_bytes_, num_blocks_, block_stride_, block_bytes_}, "flexkv-cpu")),
      index_(static_cast<int32_t>(num_blocks), evict_ratio) {
  server_->share_in_process(region_);  // an engine worker in this process copies through the same mapping
}

TierInfo CpuTier::info() const {
  return TierInfo{server_->name(), num_blocks_, block_stride_, block_bytes_, memory_bytes_};
}

void CpuTier::close() {
  server_->stop();  // first: nobody gets the memory from here on
  region_.close();
}

}  // namespace flexkv
