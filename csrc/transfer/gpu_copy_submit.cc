// GpuCopyEngine::submit: checks the block ids, counts the job in flight, queues
// its copies (copy kernel or DMA engines) and the completion callback. No lock
// is held across any CUDA call here.
#include <algorithm>
#include <climits>
#include <memory>
#include <string>
#include <vector>

#include "transfer/gpu_copy_engine.h"

namespace flexkv {

using gpu::check;
using gpu::cuda_message;
using gpu::DeviceScope;

namespace {

constexpr int32_t kWholeJob = INT32_MAX;  // the group id of the one event of a job that is not layer-wise

struct Chunk {
  uint64_t dst;
  uint64_t src;
  uint64_t bytes;
};

}  // namespace

uint64_t GpuCopyEngine::submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks,
                               const int64_t* host_blocks, size_t n, bool urgent, bool layerwise, uint64_t tag) {
  const std::shared_ptr<const Layout> layout = find_layout(layout_id);
  check_block_ids(layout->layout, layout->host, engine_blocks, host_blocks, n);
  const auto& data = *std::static_pointer_cast<const LayoutData>(layout->engine_data);
  const bool h2d = dir == CopyDirection::kHostToEngine;
  const GpuCopyPath path = h2d ? options_.path_h2d : options_.path_d2h;
  cudaStream_t stream = urgent || h2d ? load_stream_ : store_stream_;
  // The staged path needs enough chunks per slot to keep the scatter's warps (one per chunk) ahead of PCIe. A
  // layout whose block is one chunk (TensorRT-LLM's pool) moves whole blocks by DMA straight to the engine
  // instead; other jobs take the kernel.
  const uint64_t host_block = layout->host.block_bytes;
  const bool stageable = path == GpuCopyPath::kStaged && n > 0 && !layerwise && data.whole_block;
  const bool many_chunks = stageable && data.segments.size() * (std::max(options_.stage_slot_bytes, host_block) /
                                                                host_block) >= kMinStagedChunks;
  const bool staged = many_chunks && stage_ready(h2d, host_block);
  const bool whole_dma = stageable && !many_chunks && data.segments.size() == 1 && has_batch_memcpy_;
  const bool kernel = path == GpuCopyPath::kKernel || (path == GpuCopyPath::kStaged && !staged && !whole_dma);

  // Everything that may throw comes before add_job: a submit that throws queued nothing.
  DeviceScope scope(options_.device);
  auto events = std::make_shared<JobEvents>();
  if (layerwise) {
    for (const auto& g : data.groups) events->events.push_back({g.first, nullptr});
  } else {
    events->events.push_back({kWholeJob, nullptr});
  }
  for (auto& e : events->events) check(cudaEventCreateWithFlags(&e.second, cudaEventDisableTiming), "cudaEventCreate");
  auto done = std::make_unique<Completion>();  // what the callback gets
  done->engine = this;
  if (n > 0 && (kernel || staged)) {
    done->staging = staging_.take(data.segments.size() * sizeof(DeviceSegment) + 2 * n * sizeof(int64_t));
  }
  uint64_t job;
  try {
    job = add_job(layout_id, tag, events);
  } catch (...) {
    staging_.give(done->staging);
    throw;
  }
  done->job = job;

  // From here on a failure ends the job with an error; the work already queued
  // completes before the job does.
  if (n == 0) {
    for (auto& e : events->events) cudaEventRecord(e.second, stream);
  } else if (staged) {
    done->error = queue_staged(*layout, data, h2d, engine_blocks, host_blocks, n, stream, *events, done->staging);
  } else if (kernel) {
    done->error =
        queue_kernel(*layout, data, h2d, layerwise, engine_blocks, host_blocks, n, stream, *events, done->staging);
  } else {
    done->error = queue_chunks(*layout, data, h2d, layerwise, engine_blocks, host_blocks, n, stream, *events);
  }
  cudaError_t err = cudaLaunchHostFunc(stream, &GpuCopyEngine::on_complete, done.get());
  if (err == cudaSuccess) {
    done.release();  // the callback owns it now
  } else {
    // The callback will never run: wait for what was queued, then complete the job here.
    if (done->error.empty()) done->error = cuda_message(err, "cudaLaunchHostFunc");
    cudaStreamSynchronize(stream);
    on_complete(done.release());
  }
  return job;
}

std::string GpuCopyEngine::queue_kernel(const Layout& layout, const LayoutData& data, bool h2d, bool layerwise,
                                        const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                                        cudaStream_t stream, const JobEvents& events,
                                        const gpu::PinnedPool::Buffer& staging) {
  const int sms = h2d ? options_.sms_h2d : options_.sms_d2h;
  std::string error;
  void* dev = upload_lists(data, engine_blocks, host_blocks, n, stream, staging, &error);
  if (dev == nullptr) {
    for (const auto& ev : events.events) cudaEventRecord(ev.second, stream);
    return error;
  }
  const size_t nseg = data.segments.size();
  const size_t seg_bytes = nseg * sizeof(DeviceSegment);
  cudaError_t err = cudaSuccess;
  const auto* dsegs = static_cast<const DeviceSegment*>(dev);
  const auto* deng = reinterpret_cast<const int64_t*>(static_cast<const char*>(dev) + seg_bytes);
  // A job that is not layer-wise runs every segment in one launch.
  std::vector<std::pair<int32_t, size_t>> whole{{kWholeJob, nseg}};
  const auto& groups = layerwise ? data.groups : whole;
  size_t first = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const size_t count = groups[g].second;
    if (error.empty()) {
      const int64_t items = static_cast<int64_t>(count * n);
      const int64_t warps_per_block = kCopyThreadsPerBlock / 32;
      const int grid = static_cast<int>(std::min<int64_t>(sms, (items + warps_per_block - 1) / warps_per_block));
      err = launch_block_copy(h2d, data.vector_bytes, grid, stream, dsegs + first, static_cast<int>(count), deng,
                              deng + n, static_cast<int64_t>(n), layout.host_device_base, layout.host.block_bytes);
      if (err != cudaSuccess) error = cuda_message(err, "block copy kernel launch");
    }
    first += count;
    cudaEventRecord(events.events[g].second, stream);
  }
  cudaFreeAsync(dev, stream);
  return error;
}

void* GpuCopyEngine::upload_lists(const LayoutData& data, const int64_t* engine_blocks, const int64_t* host_blocks,
                                  size_t n, cudaStream_t stream, const gpu::PinnedPool::Buffer& staging,
                                  std::string* error) {
  const size_t seg_bytes = data.segments.size() * sizeof(DeviceSegment);
  const size_t bytes = seg_bytes + 2 * n * sizeof(int64_t);  // what submit sized the staging buffer for
  // The segments (in group order) and the two block lists travel in one upload.
  auto* segs = static_cast<DeviceSegment*>(staging.first);
  std::copy(data.segments.begin(), data.segments.end(), segs);
  auto* blocks = reinterpret_cast<int64_t*>(static_cast<char*>(staging.first) + seg_bytes);
  std::copy(engine_blocks, engine_blocks + n, blocks);
  std::copy(host_blocks, host_blocks + n, blocks + n);
  void* dev = nullptr;
  cudaError_t err = cudaMallocFromPoolAsync(&dev, bytes, pool_, stream);
  if (err != cudaSuccess) {
    *error = cuda_message(err, "cudaMallocFromPoolAsync (block lists)");
    return nullptr;
  }
  err = cudaMemcpyAsync(dev, staging.first, bytes, cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) *error = cuda_message(err, "cudaMemcpyAsync (block lists)");
  return dev;
}

std::string GpuCopyEngine::queue_chunks(const Layout& layout, const LayoutData& data, bool h2d, bool layerwise,
                                        const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                                        cudaStream_t stream, const JobEvents& events) {
  const GpuCopyPath path = h2d ? options_.path_h2d : options_.path_d2h;
  const EngineLayout& el = layout.layout;
  const HostRegion& host = layout.host;
  const int lane = stream == load_stream_ ? 0 : 1;
  std::vector<std::pair<int32_t, size_t>> whole{{kWholeJob, data.order.size()}};
  const auto& groups = layerwise ? data.groups : whole;
  std::string error;
  std::vector<Chunk> chunks;
  size_t first = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    chunks.clear();
    chunks.reserve(groups[g].second * n);
    for (size_t k = first; k < first + groups[g].second; ++k) {
      const CopySegment& c = el.segments[data.order[k]];
      for (size_t i = 0; i < n; ++i) {
        const uint64_t eng = c.engine_base + engine_blocks[i] * c.engine_block_stride;
        const uint64_t hst = host.base + static_cast<uint64_t>(host_blocks[i]) * host.block_bytes + c.host_offset;
        const Chunk ch = h2d ? Chunk{eng, hst, c.bytes} : Chunk{hst, eng, c.bytes};
        const bool coalesce = path != GpuCopyPath::kMemcpyPerChunk && !chunks.empty();
        if (coalesce && chunks.back().dst + chunks.back().bytes == ch.dst &&
            chunks.back().src + chunks.back().bytes == ch.src) {
          chunks.back().bytes += ch.bytes;
        } else {
          chunks.push_back(ch);
        }
      }
    }
    first += groups[g].second;
    if (error.empty()) {
#if CUDART_VERSION >= 12080
      if (path != GpuCopyPath::kMemcpyPerChunk && has_batch_memcpy_) {  // kCopyEngine, or kStaged's whole blocks
        std::vector<void*> dsts(chunks.size());
        std::vector<const void*> srcs(chunks.size());
        std::vector<size_t> sizes(chunks.size());
        for (size_t i = 0; i < chunks.size(); ++i) {
          dsts[i] = reinterpret_cast<void*>(chunks[i].dst);
          srcs[i] = reinterpret_cast<const void*>(chunks[i].src);
          sizes[i] = chunks[i].bytes;
        }
        error = queue_batch(dsts, srcs, sizes, lane, stream);
      } else
#endif
      {
        const cudaMemcpyKind kind = h2d ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
        for (const Chunk& c : chunks) {
          cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src),
                                            c.bytes, kind, stream);
          if (err != cudaSuccess) {
            error = cuda_message(err, "cudaMemcpyAsync");
            break;
          }
        }
      }
    }
    cudaEventRecord(events.events[g].second, stream);
  }
  return error;
}

std::string GpuCopyEngine::queue_batch(std::vector<void*>& dsts, std::vector<const void*>& srcs,
                                       std::vector<size_t>& sizes, int lane, cudaStream_t stream) {
#if CUDART_VERSION >= 12080
  cudaMemcpyAttributes attr = {};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  const size_t count = dsts.size();
  const size_t parts = std::min<size_t>(kCeStreams, count);
  // The parts fork from `stream` through one event and join it through one event each. The
  // events are this call's alone while it issues them (EventPool), so concurrent submits never
  // share one; the aux streams they share only order one submit's parts after another's. All
  // events are taken first: a part forked without its join would let the job complete early.
  std::vector<cudaEvent_t> events;
  if (parts > 1) {
    try {
      for (size_t p = 0; p <= parts; ++p) events.push_back(fork_join_.take());
    } catch (const std::exception& e) {
      fork_join_.give(events);
      return e.what();
    }
    cudaEventRecord(events[0], stream);
  }
  std::string error;
  for (size_t p = 0; p < parts && error.empty(); ++p) {
    const size_t lo = count * p / parts, hi = count * (p + 1) / parts;
    cudaStream_t st = stream;
    if (parts > 1) {
      st = aux_[lane][p];
      cudaStreamWaitEvent(st, events[0], 0);
    }
    size_t attr_index = 0;
#if CUDART_VERSION >= 13000
    cudaError_t err = cudaMemcpyBatchAsync(dsts.data() + lo, srcs.data() + lo, sizes.data() + lo, hi - lo, &attr,
                                           &attr_index, 1, st);
#else
    size_t fail_index = 0;
    cudaError_t err = cudaMemcpyBatchAsync(dsts.data() + lo, const_cast<void**>(srcs.data()) + lo, sizes.data() + lo,
                                           hi - lo, &attr, &attr_index, 1, &fail_index, st);
#endif
    if (err != cudaSuccess) error = cuda_message(err, "cudaMemcpyBatchAsync");
    if (parts > 1) {
      cudaEventRecord(events[p + 1], st);
      cudaStreamWaitEvent(stream, events[p + 1], 0);
    }
  }
  fork_join_.give(events);
  return error;
#else
  (void)dsts, (void)srcs, (void)sizes, (void)lane, (void)stream;
  return "cudaMemcpyBatchAsync needs CUDA 12.8 or newer";
#endif
}

}  // namespace flexkv
