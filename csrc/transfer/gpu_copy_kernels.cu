// Block copy kernels between an engine's KV memory on the GPU and pinned host
// memory. One warp copies one chunk (one segment of one block); lanes move
// consecutive vectors, so a warp's accesses are coalesced; each lane keeps
// kUnroll loads in flight before it stores, which hides the PCIe latency of
// host memory. Loads bypass L1 and ask L2 for 256 bytes at a time (larger PCIe
// reads from host memory); stores are streaming: the bytes are not read again
// soon, so they should not displace the engine's working set in L2.
#include <cuda_runtime.h>

#include "gpu_copy_kernels.h"

namespace flexkv {
namespace {

constexpr int kUnroll = 8;

template <typename V>
__device__ __forceinline__ V load(const V* p) {
  if constexpr (sizeof(V) == 16) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return *reinterpret_cast<V*>(&r);
  } else {
    return __ldcs(p);
  }
}

template <typename V>
__device__ __forceinline__ void copy_chunk(unsigned char* dst, const unsigned char* src, uint64_t bytes, int lane) {
  const V* s = reinterpret_cast<const V*>(src);
  V* d = reinterpret_cast<V*>(dst);
  const uint64_t count = bytes / sizeof(V);
  uint64_t i = lane;
  for (; i + (kUnroll - 1) * 32 < count; i += kUnroll * 32) {
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = load(s + i + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) __stcs(d + i + u * 32, r[u]);
  }
  for (; i < count; i += 32) __stcs(d + i, load(s + i));
}

template <typename V, bool kHostToEngine>
__global__ void __launch_bounds__(kCopyThreadsPerBlock)
    block_copy_kernel(const DeviceSegment* __restrict__ segments, int num_segments,
                      const int64_t* __restrict__ engine_blocks, const int64_t* __restrict__ host_blocks, int64_t n,
                      uint64_t host_base, uint64_t host_stride) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t num_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  const int64_t items = n * num_segments;
  for (int64_t item = warp; item < items; item += num_warps) {
    const int64_t s = item / n;
    const int64_t b = item - s * n;
    const DeviceSegment seg = segments[s];
    unsigned char* engine = reinterpret_cast<unsigned char*>(seg.engine_base + engine_blocks[b] * seg.engine_stride);
    unsigned char* host =
        reinterpret_cast<unsigned char*>(host_base + static_cast<uint64_t>(host_blocks[b]) * host_stride +
                                         seg.host_offset);
    if (kHostToEngine) {
      copy_chunk<V>(engine, host, seg.bytes, lane);
    } else {
      copy_chunk<V>(host, engine, seg.bytes, lane);
    }
  }
}

template <typename V>
cudaError_t launch_typed(bool host_to_engine, int grid, cudaStream_t stream, const DeviceSegment* segments,
                         int num_segments, const int64_t* engine_blocks, const int64_t* host_blocks, int64_t n,
                         uint64_t host_base, uint64_t host_stride) {
  if (host_to_engine) {
    block_copy_kernel<V, true><<<grid, kCopyThreadsPerBlock, 0, stream>>>(
        segments, num_segments, engine_blocks, host_blocks, n, host_base, host_stride);
  } else {
    block_copy_kernel<V, false><<<grid, kCopyThreadsPerBlock, 0, stream>>>(
        segments, num_segments, engine_blocks, host_blocks, n, host_base, host_stride);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_block_copy(bool host_to_engine, int vector_bytes, int grid, cudaStream_t stream,
                              const DeviceSegment* segments, int num_segments, const int64_t* engine_blocks,
                              const int64_t* host_blocks, int64_t n, uint64_t host_base, uint64_t host_stride) {
  switch (vector_bytes) {
    case 16:
      return launch_typed<uint4>(host_to_engine, grid, stream, segments, num_segments, engine_blocks, host_blocks, n,
                                 host_base, host_stride);
    case 8:
      return launch_typed<uint2>(host_to_engine, grid, stream, segments, num_segments, engine_blocks, host_blocks, n,
                                 host_base, host_stride);
    case 4:
      return launch_typed<unsigned int>(host_to_engine, grid, stream, segments, num_segments, engine_blocks,
                                        host_blocks, n, host_base, host_stride);
    default:
      return launch_typed<unsigned char>(host_to_engine, grid, stream, segments, num_segments, engine_blocks,
                                         host_blocks, n, host_base, host_stride);
  }
}

}  // namespace flexkv
