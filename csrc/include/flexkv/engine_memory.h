// EngineMemory: where an engine keeps its KV cache, described by base pointers,
// strides and a dtype, so that the C++ API (cache.h) can copy whole blocks
// between it and the CPU tier.
//
// The memory holds num_blocks engine blocks. For every (layer, k|v) plane, the
// chunk of engine block b (tokens_per_block tokens of that layer's K or V, or
// the MLA latent) starts at `plane.base + b * plane.block_stride_bytes` and is
// ModelShape::chunk_bytes() long. `device` is -1 for host memory (copies run on
// host threads) or a CUDA device ordinal (copies run on that device's streams;
// the build needs CUDA).
#pragma once

#include <cstdint>
#include <vector>

#include "flexkv/cache_options.h"

namespace flexkv {

struct KvPlane {
  const void* base = nullptr;      // chunk of engine block 0
  int64_t block_stride_bytes = 0;  // distance from one engine block to the next
};

struct EngineMemory {
  int device = -1;
  DType dtype = DType::kBFloat16;
  int64_t num_blocks = 0;
  int num_layers = 0;
  int kv_factor = 2;            // 2 for K and V, 1 for MLA
  std::vector<KvPlane> planes;  // planes[layer * kv_factor + kv]

  // TensorRT-LLM's pool: one buffer [num_blocks, num_layers, kv_factor,
  // chunk_elems] (chunk_elems = tokens_per_block * kv_heads * head_size), so
  // a block is contiguous across layers.
  static EngineMemory block_major_pool(void* base, DType dtype, int64_t num_blocks, int num_layers, int kv_factor,
                                       int64_t chunk_elems, int device = -1);
  // One buffer per layer and k|v (vLLM's and SGLang's per-layer caches):
  // buffers[layer * kv_factor + kv] holds [num_blocks, chunk_elems].
  static EngineMemory per_layer_buffers(const std::vector<void*>& buffers, DType dtype, int64_t num_blocks,
                                        int num_layers, int kv_factor, int64_t chunk_elems, int device = -1);
};

}  // namespace flexkv
