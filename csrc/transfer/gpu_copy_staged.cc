// GpuCopyEngine's staged path: whole host blocks cross PCIe by DMA into a ring
// of device slots, and the copy kernel scatters them into the engine's blocks
// (a store: the kernel gathers into a slot, then DMA to the host blocks).
//
// Why: SM loads of pinned host memory top out below a contiguous copy (92% on
// an H200), and a kernel in each direction at once shares the SMs' PCIe
// requests badly (64-69% of two contiguous copies). DMA of whole blocks runs at
// the contiguous rate, and the device-side scatter costs a few SMs at device
// memory speed. benchmarks/cuda/pcie_paths.cu measures the variants.
//
// Ordering, per direction: the DMA stream and the job's stream alternate on the
// slots. A slot is filled after the stage that drained it last has finished
// (`free` event) and drained after it is full (`full` event). Jobs take slots
// in turn under the ring's mutex, so one job's groups are never interleaved
// with another's and every wait refers to the latest record of its event.
#include <algorithm>
#include <exception>
#include <numeric>
#include <string>
#include <vector>

#include "transfer/gpu_copy_engine.h"

namespace flexkv {

using gpu::cuda_message;
using gpu::DeviceScope;

namespace {

// Up to this many blocks share a slot (the slot-local id list is this long).
constexpr int64_t kMaxSlotBlocks = 16384;

// One DMA of m whole blocks between a slot and scattered host blocks.
cudaError_t dma_blocks(std::vector<void*>& dsts, std::vector<const void*>& srcs, std::vector<size_t>& sizes,
                       bool batch, bool h2d, cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  if (batch) {
    cudaMemcpyAttributes attr = {};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    return cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index, 1, stream);
#else
    size_t fail_index = 0;
    return cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(), dsts.size(), &attr,
                                &attr_index, 1, &fail_index, stream);
#endif
  }
#endif
  (void)batch;
  const cudaMemcpyKind kind = h2d ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  for (size_t i = 0; i < dsts.size(); ++i) {
    cudaError_t err = cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], kind, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

void GpuCopyEngine::release_ring(StageRing& ring) {
  for (void* s : ring.slots) {
    if (s != nullptr) cudaFree(s);
  }
  for (auto* evs : {&ring.full, &ring.free}) {
    for (cudaEvent_t e : *evs) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    evs->clear();
  }
  if (ring.local_ids != nullptr) cudaFree(ring.local_ids);
  ring.slots.clear();
  ring.local_ids = nullptr;
  ring.slot_bytes = 0;
}

bool GpuCopyEngine::stage_ready(bool h2d, uint64_t block_bytes) {
  StageRing& ring = rings_[h2d ? 0 : 1];
  // A block larger than a slot is not staged: the kernel moves it.
  if (block_bytes == 0 || block_bytes > options_.stage_slot_bytes) return false;
  std::lock_guard<std::mutex> g(ring.mu);
  if (ring.unusable) return false;
  if (!ring.slots.empty()) return true;
  DeviceScope scope(options_.device);
  const uint64_t bytes = options_.stage_slot_bytes;
  bool ok = true;
  ring.slots.assign(kStageSlots, nullptr);
  for (void*& s : ring.slots) ok = ok && cudaMalloc(&s, bytes) == cudaSuccess;
  ring.full.assign(kStageSlots, nullptr);
  ring.free.assign(kStageSlots, nullptr);
  for (int k = 0; k < kStageSlots && ok; ++k) {
    ok = cudaEventCreateWithFlags(&ring.full[k], cudaEventDisableTiming) == cudaSuccess &&
         cudaEventCreateWithFlags(&ring.free[k], cudaEventDisableTiming) == cudaSuccess;
  }
  if (ok) {
    std::vector<int64_t> ids(static_cast<size_t>(kMaxSlotBlocks));
    std::iota(ids.begin(), ids.end(), int64_t{0});
    ok = cudaMalloc(reinterpret_cast<void**>(&ring.local_ids), ids.size() * sizeof(int64_t)) == cudaSuccess &&
         cudaMemcpy(ring.local_ids, ids.data(), ids.size() * sizeof(int64_t), cudaMemcpyHostToDevice) == cudaSuccess;
  }
  if (!ok) {
    cudaGetLastError();  // an allocation failure is not sticky: jobs take the kernel path instead
    ring.unusable = true;
    release_ring(ring);
    return false;
  }
  ring.slot_bytes = bytes;
  ring.capacity = kMaxSlotBlocks;
  return true;
}

void GpuCopyEngine::free_rings() {
  for (StageRing& ring : rings_) {
    std::lock_guard<std::mutex> g(ring.mu);
    release_ring(ring);
  }
}

std::string GpuCopyEngine::queue_staged(const Layout& layout, const LayoutData& data, bool h2d,
                                        const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                                        cudaStream_t stream, const JobEvents& events,
                                        const gpu::PinnedPool::Buffer& staging) {
  std::string error;
  void* dev = upload_lists(data, engine_blocks, host_blocks, n, stream, staging, &error);
  if (dev == nullptr) {
    for (const auto& ev : events.events) cudaEventRecord(ev.second, stream);
    return error;
  }
  cudaEvent_t join = nullptr;  // a store's end on its DMA stream, joined into the job's stream
  if (!h2d) {
    try {
      join = fork_join_.take();
    } catch (const std::exception& e) {
      for (const auto& ev : events.events) cudaEventRecord(ev.second, stream);
      cudaFreeAsync(dev, stream);
      return e.what();
    }
  }
  StageRing& ring = rings_[h2d ? 0 : 1];
  cudaStream_t dma = dma_[h2d ? 0 : 1];
  const size_t nseg = data.segments.size();
  const auto* dsegs = static_cast<const DeviceSegment*>(dev);
  const auto* deng = reinterpret_cast<const int64_t*>(static_cast<const char*>(dev) + nseg * sizeof(DeviceSegment));
  const uint64_t stride = layout.host.block_bytes;  // a slot holds blocks at the host tier's stride
  const uint64_t span = data.block_span;            // and DMA moves the bytes the segments cover
  const int sms = h2d ? options_.sms_h2d : options_.sms_d2h;
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  {
    std::lock_guard<std::mutex> g(ring.mu);
    const int64_t per_slot =
        std::max<int64_t>(1, std::min<int64_t>(ring.capacity, static_cast<int64_t>(ring.slot_bytes / stride)));
    for (int64_t i0 = 0; i0 < static_cast<int64_t>(n) && error.empty(); i0 += per_slot) {
      const int64_t m = std::min<int64_t>(per_slot, static_cast<int64_t>(n) - i0);
      const int k = ring.next;
      ring.next = (k + 1) % kStageSlots;
      auto* slot = static_cast<unsigned char*>(ring.slots[k]);
      dsts.resize(m), srcs.resize(m), sizes.assign(m, span);
      for (int64_t j = 0; j < m; ++j) {
        auto* host = reinterpret_cast<unsigned char*>(layout.host.base + host_blocks[i0 + j] * stride);
        dsts[j] = h2d ? static_cast<void*>(slot + j * stride) : static_cast<void*>(host);
        srcs[j] = h2d ? static_cast<const void*>(host) : static_cast<const void*>(slot + j * stride);
      }
      const int64_t warps_per_block = kCopyThreadsPerBlock / 32;
      const int grid = static_cast<int>(
          std::min<int64_t>(sms, (static_cast<int64_t>(nseg) * m + warps_per_block - 1) / warps_per_block));
      cudaStream_t fill = h2d ? dma : stream, drain = h2d ? stream : dma;
      cudaStreamWaitEvent(fill, ring.free[k], 0);
      cudaError_t err =
          h2d ? dma_blocks(dsts, srcs, sizes, has_batch_memcpy_, true, fill)
              : launch_block_copy(false, data.vector_bytes, grid, fill, dsegs, static_cast<int>(nseg), deng + i0,
                                  ring.local_ids, m, reinterpret_cast<uint64_t>(slot), stride);
      if (err != cudaSuccess) error = cuda_message(err, h2d ? "staged DMA to the device" : "staged gather kernel");
      cudaEventRecord(ring.full[k], fill);
      cudaStreamWaitEvent(drain, ring.full[k], 0);
      if (error.empty()) {
        err = h2d ? launch_block_copy(true, data.vector_bytes, grid, drain, dsegs, static_cast<int>(nseg), deng + i0,
                                      ring.local_ids, m, reinterpret_cast<uint64_t>(slot), stride)
                  : dma_blocks(dsts, srcs, sizes, has_batch_memcpy_, false, drain);
        if (err != cudaSuccess) error = cuda_message(err, h2d ? "staged scatter kernel" : "staged DMA to the host");
      }
      cudaEventRecord(ring.free[k], drain);
    }
    if (!h2d) {  // a store ends with its DMA: the job's stream waits for it before its events and callback
      cudaEventRecord(join, dma);
      cudaStreamWaitEvent(stream, join, 0);
      fork_join_.give({join});
    }
  }
  for (const auto& ev : events.events) cudaEventRecord(ev.second, stream);
  cudaFreeAsync(dev, stream);
  return error;
}

}  // namespace flexkv
