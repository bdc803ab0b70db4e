#include "flexkv/engine_memory.h"

#include <stdexcept>
#include <string>

namespace flexkv {

namespace {

// The fields both factories share, checked; planes are left to the caller.
EngineMemory empty_memory(DType dtype, int64_t num_blocks, int num_layers, int kv_factor, int64_t chunk_elems,
                          int device) {
  if (num_blocks < 1) throw std::invalid_argument("num_blocks is " + std::to_string(num_blocks) + "; it must be at least 1");
  if (num_layers < 1) throw std::invalid_argument("num_layers is " + std::to_string(num_layers) + "; it must be at least 1");
  if (kv_factor != 1 && kv_factor != 2) {
    throw std::invalid_argument("kv_factor is " + std::to_string(kv_factor) + "; use 2 (K and V) or 1 (MLA)");
  }
  if (chunk_elems < 1) throw std::invalid_argument("chunk_elems is " + std::to_string(chunk_elems) + "; it must be at least 1");
  EngineMemory m;
  m.device = device;
  m.dtype = dtype;
  m.num_blocks = num_blocks;
  m.num_layers = num_layers;
  m.kv_factor = kv_factor;
  return m;
}

}  // namespace

EngineMemory EngineMemory::block_major_pool(void* base, DType dtype, int64_t num_blocks, int num_layers,
                                            int kv_factor, int64_t chunk_elems, int device) {
  EngineMemory m = empty_memory(dtype, num_blocks, num_layers, kv_factor, chunk_elems, device);
  if (base == nullptr) throw std::invalid_argument("block_major_pool: base is null");
  const int64_t chunk = chunk_elems * static_cast<int64_t>(dtype_size(dtype));
  const int64_t stride = chunk * num_layers * kv_factor;
  for (int p = 0; p < num_layers * kv_factor; ++p) {
    m.planes.push_back({static_cast<const uint8_t*>(base) + static_cast<int64_t>(p) * chunk, stride});
  }
  return m;
}

EngineMemory EngineMemory::per_layer_buffers(const std::vector<void*>& buffers, DType dtype, int64_t num_blocks,
                                             int num_layers, int kv_factor, int64_t chunk_elems, int device) {
  EngineMemory m = empty_memory(dtype, num_blocks, num_layers, kv_factor, chunk_elems, device);
  if (buffers.size() != static_cast<size_t>(num_layers) * static_cast<size_t>(kv_factor)) {
    throw std::invalid_argument("per_layer_buffers: " + std::to_string(buffers.size()) + " buffers for " +
                                std::to_string(num_layers) + " layers x " + std::to_string(kv_factor) +
                                "; pass one buffer per layer and k|v, ordered [layer * kv_factor + kv]");
  }
  const int64_t chunk = chunk_elems * static_cast<int64_t>(dtype_size(dtype));
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (buffers[i] == nullptr) throw std::invalid_argument("per_layer_buffers: buffer " + std::to_string(i) + " is null");
    m.planes.push_back({buffers[i], chunk});
  }
  return m;
}

}  // namespace flexkv
