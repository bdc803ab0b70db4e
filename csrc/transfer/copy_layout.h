// Where a block's bytes live in an engine's KV memory and in a host tier, as
// the copy engines (host threads, CUDA kernels, the GPU copy engine) see them.
//
// An engine layout is a list of segments. A segment is one contiguous chunk of
// every engine block (for example layer 3's K for one block): it starts at
// `engine_base + engine_block * engine_block_stride` and has `bytes` bytes; in a
// host block it lies at `host_offset`. Adjacent chunks of a block are one
// segment, so a block-first engine layout is a single segment per block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace flexkv {

struct CopySegment {
  uint64_t engine_base = 0;
  int64_t engine_block_stride = 0;
  uint64_t host_offset = 0;
  uint64_t bytes = 0;
  // Layer-wise copies complete group by group, in ascending order; a segment's
  // group is the last layer it holds. Copies that are not layer-wise ignore it.
  int32_t group = 0;
};

struct EngineLayout {
  std::vector<CopySegment> segments;
  int64_t num_blocks = 0;  // engine blocks 0..num_blocks-1 are addressable
};

struct HostRegion {
  uint64_t base = 0;
  uint64_t block_bytes = 0;  // distance between two host blocks
  int64_t num_blocks = 0;
};

enum class CopyDirection { kHostToEngine, kEngineToHost };

// Throws std::invalid_argument when a segment is empty, has a null base or
// reaches past a host block.
void validate_layout(const EngineLayout& layout, const HostRegion& host);

// Throws std::out_of_range naming the first engine or host block id outside its range.
void check_block_ids(const EngineLayout& layout, const HostRegion& host, const int64_t* engine_blocks,
                     const int64_t* host_blocks, size_t n);

}  // namespace flexkv
