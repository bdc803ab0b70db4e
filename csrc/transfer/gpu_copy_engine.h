// GpuCopyEngine: the CopyEngine for engine KV memory on one CUDA device and a
// host tier in pinned memory, on the engine's own CUDA streams. CUDA builds
// only; everything else reaches it through make_gpu_copy_engine (copy_engine.h).
//
// Two paths, chosen per direction (GpuCopyOptions):
//  - kKernel: a copy kernel on `sms` thread blocks, one warp per chunk, 16-byte
//    vector loads and stores (8, 4 or 1 bytes when the layout is not 16-byte
//    aligned), streaming cache hints. The SMs read or write the host memory
//    across PCIe, so it must be registered (register_host).
//  - kCopyEngine: the DMA engines, no SMs: cudaMemcpyBatchAsync where the CUDA
//    runtime has it (12.8+), split over several streams so that several DMA
//    engines work at once; otherwise one cudaMemcpyAsync per chunk. Adjacent
//    chunks are coalesced first. Fast for chunks of 64 KiB and more.
//  - kStaged: whole host blocks cross PCIe by DMA (one cudaMemcpyBatchAsync per
//    slot) into a ring of device slots, and the copy kernel scatters them from
//    the slot into the engine's blocks (a store gathers into a slot, then DMA).
//    DMA and kernel overlap slot by slot on two streams. Needs a job that is not
//    layer-wise and a layout whose segments cover the whole host block (one
//    rank, or MLA); other jobs take kKernel. The slots are allocated on the
//    first staged job; if that fails, kKernel serves every job. Blocks larger
//    than a slot take kKernel. A layout whose
//    block is one chunk (fewer than 32 chunks per slot: too few warps for
//    the scatter) moves whole blocks by batched DMA straight to the engine.
// kMemcpyPerChunk (one cudaMemcpyAsync per chunk, no coalescing) is the
// baseline the benchmarks compare against.
//
// Loads (host to engine) and urgent jobs run on a high-priority stream, stores
// on another, so a load never queues behind a store. Completion is reported by
// a CUDA host callback that only returns the job's staging buffer and calls
// JobTable::finish: it takes no lock that any thread holds across a CUDA call.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "transfer/copy_engine_base.h"
#include "transfer/gpu_copy_kernels.h"
#include "transfer/gpu_copy_util.h"

namespace flexkv {

class GpuCopyEngine final : public CopyEngineBase {
 public:
  // Throws std::runtime_error when no CUDA device is usable, std::invalid_argument
  // for a device that does not exist or an option out of range.
  explicit GpuCopyEngine(const GpuCopyOptions& options);
  // Waits for every job, then unpins the host memory it pinned.
  ~GpuCopyEngine() override;
  GpuCopyEngine(const GpuCopyEngine&) = delete;
  GpuCopyEngine& operator=(const GpuCopyEngine&) = delete;

  std::string name() const override { return "cuda:" + std::to_string(options_.device); }
  int device() const override { return options_.device; }
  uint64_t submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks, const int64_t* host_blocks,
                  size_t n, bool urgent, bool layerwise, uint64_t tag) override;
  void wait_group(uint64_t job, int32_t group) override;
  void stream_wait_group(uint64_t job, int32_t group, void* stream) override;
  void* stream(CopyDirection dir) const override;

 private:
  // What register_layout keeps of a layout for the submits.
  struct LayoutData {
    std::vector<size_t> order;             // segment indexes, ascending by group (stable)
    std::vector<DeviceSegment> segments;   // the segments in that order, as the kernel reads them
    std::vector<std::pair<int32_t, size_t>> groups;  // (group id, segments in it), ascending
    int vector_bytes = 1;                  // the widest access every address, stride and size allows
    uint64_t block_span = 0;               // bytes of a host block the segments cover, from offset 0
    bool whole_block = false;              // the segments tile [0, block_span): a block can be staged whole
  };
  // The staged path's device slots of one direction; jobs take slots in turn under `mu`.
  struct StageRing {
    std::mutex mu;
    std::vector<void*> slots;
    std::vector<cudaEvent_t> full, free;  // a slot is filled / was drained (last recorded)
    int64_t* local_ids = nullptr;          // 0, 1, ...: block ids within a slot, for the kernel
    int64_t capacity = 0;                  // the most blocks a slot holds (local_ids' length)
    uint64_t slot_bytes = 0;               // each slot's size (options' stage_slot_bytes)
    int next = 0;
    bool unusable = false;                 // allocation failed: kKernel instead
  };
  // A job's CUDA events, one per group it completes (recorded after that group),
  // as wait_group finds them. Destroyed when the job is collected.
  struct JobEvents {
    std::vector<std::pair<int32_t, cudaEvent_t>> events;  // (group id, event), ascending
    ~JobEvents();
  };
  // What the completion callback needs; owned by the callback.
  struct Completion {
    GpuCopyEngine* engine = nullptr;
    uint64_t job = 0;
    std::string error;
    gpu::PinnedPool::Buffer staging{nullptr, 0};
  };
  static void CUDART_CB on_complete(void* completion);
  void destroy_streams();  // the streams and the pool, with this engine's device selected

  Pinned pin(uint64_t base, uint64_t bytes) override;
  void unpin(uint64_t base, const Pinned& pinned) override;
  std::shared_ptr<const void> prepare_layout(const Layout& layout) override;

  // Queue a job's copies on `stream`, recording events[g] after group g of the
  // copy. Return "" or the first CUDA error (what was queued still completes).
  std::string queue_kernel(const Layout& layout, const LayoutData& data, bool h2d, bool layerwise,
                           const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                           cudaStream_t stream, const JobEvents& events, const gpu::PinnedPool::Buffer& staging);
  std::string queue_chunks(const Layout& layout, const LayoutData& data, bool h2d, bool layerwise,
                           const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                           cudaStream_t stream, const JobEvents& events);
  // A job through the device slots (gpu_copy_staged.cc); `stream` is the job's stream, which its events follow.
  std::string queue_staged(const Layout& layout, const LayoutData& data, bool h2d, const int64_t* engine_blocks,
                           const int64_t* host_blocks, size_t n, cudaStream_t stream, const JobEvents& events,
                           const gpu::PinnedPool::Buffer& staging);
  // True when the ring of that direction is allocated (allocating it on first use) and holds blocks of
  // `block_bytes`; never throws.
  bool stage_ready(bool h2d, uint64_t block_bytes);
  void free_rings();
  static void release_ring(StageRing& ring);  // frees its slots, events and ids (the caller holds its mutex)
  // The block lists (and the segments) of a kernel job, uploaded on `stream` into pool memory: the device
  // address, or nullptr with `error` set.
  void* upload_lists(const LayoutData& data, const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                     cudaStream_t stream, const gpu::PinnedPool::Buffer& staging, std::string* error);
  // One group's chunks on the DMA engines, fanned out over the aux streams of `lane`.
  std::string queue_batch(std::vector<void*>& dsts, std::vector<const void*>& srcs, std::vector<size_t>& sizes,
                          int lane, cudaStream_t stream);

  static constexpr int kCeStreams = 8;  // copy-engine batches in parallel: one keeps one DMA engine busy
  static constexpr int kStageSlots = 4;
  static constexpr uint64_t kMinStagedChunks = 32;  // chunks per slot below which a job is not staged

  const GpuCopyOptions options_;
  cudaStream_t load_stream_ = nullptr;
  cudaStream_t store_stream_ = nullptr;
  cudaStream_t aux_[2][kCeStreams] = {};  // [0]: beside the load stream, [1]: beside the store stream
  cudaStream_t dma_[2] = {};               // the staged path's DMA: [0] loads, [1] stores
  StageRing rings_[2];                     // [0] loads, [1] stores
  cudaMemPool_t pool_ = nullptr;           // device memory for the block lists of kernel jobs
  bool has_batch_memcpy_ = false;
  gpu::PinnedPool staging_;
  gpu::EventPool fork_join_;
};

}  // namespace flexkv
