// Launchers of the block copy kernels (gpu_copy_kernels.cu), for gpu_copy_engine.cc.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flexkv {

// One segment as the kernel reads it (device memory).
struct DeviceSegment {
  uint64_t engine_base;
  int64_t engine_stride;
  uint64_t host_offset;
  uint64_t bytes;
};

constexpr int kCopyThreadsPerBlock = 1024;

// Copies segments [0, num_segments) of blocks engine_blocks[i] <-> host_blocks[i],
// i < n, one warp per (segment, block) chunk, on `grid` thread blocks.
// `vector_bytes` (16, 8, 4 or 1) must divide every address, stride and size.
// host_base is the device-side address of host block 0. Returns the launch error.
cudaError_t launch_block_copy(bool host_to_engine, int vector_bytes, int grid, cudaStream_t stream,
                              const DeviceSegment* segments, int num_segments, const int64_t* engine_blocks,
                              const int64_t* host_blocks, int64_t n, uint64_t host_base, uint64_t host_stride);

}  // namespace flexkv
