#include "transfer/copy_layout.h"

#include <stdexcept>
#include <string>

namespace flexkv {

void validate_layout(const EngineLayout& layout, const HostRegion& host) {
  if (layout.segments.empty()) throw std::invalid_argument("engine layout has no segments");
  if (layout.num_blocks <= 0) throw std::invalid_argument("engine layout has no blocks");
  for (size_t s = 0; s < layout.segments.size(); ++s) {
    const CopySegment& seg = layout.segments[s];
    if (seg.engine_base == 0) throw std::invalid_argument("segment " + std::to_string(s) + " has a null base");
    if (seg.bytes == 0) throw std::invalid_argument("segment " + std::to_string(s) + " is empty");
    if (seg.host_offset + seg.bytes > host.block_bytes) {
      throw std::invalid_argument("segment " + std::to_string(s) + " ends at byte " +
                                  std::to_string(seg.host_offset + seg.bytes) + " of a host block of " +
                                  std::to_string(host.block_bytes) + " bytes");
    }
  }
}

void check_block_ids(const EngineLayout& layout, const HostRegion& host, const int64_t* engine_blocks,
                     const int64_t* host_blocks, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (engine_blocks[i] < 0 || engine_blocks[i] >= layout.num_blocks) {
      throw std::out_of_range("engine block id " + std::to_string(engine_blocks[i]) + " outside [0, " +
                              std::to_string(layout.num_blocks) + ")");
    }
    if (host_blocks[i] < 0 || host_blocks[i] >= host.num_blocks) {
      throw std::out_of_range("host block id " + std::to_string(host_blocks[i]) + " outside [0, " +
                              std::to_string(host.num_blocks) + ")");
    }
  }
}

}  // namespace flexkv
