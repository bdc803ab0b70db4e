// GpuCopyEngine: construction, host pinning, layout registration, completion
// and the per-group waits. The submit path is in gpu_copy_submit.cc.
#include "transfer/gpu_copy_engine.h"

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>

namespace flexkv {

using gpu::check;
using gpu::cuda_message;
using gpu::DeviceScope;

namespace {

int alignment_of(uint64_t v) {
  if (v % 16 == 0) return 16;
  if (v % 8 == 0) return 8;
  if (v % 4 == 0) return 4;
  return 1;
}

// Host ranges this process's engines pinned, by base, with how many engines use each: engines of one process
// share a CPU tier's mapping (MemfdRegion::alias), and the range stays pinned until the last of them lets go.
std::mutex pinned_mu;
std::map<uint64_t, int>& pinned_users() {
  static auto* users = new std::map<uint64_t, int>();  // never destroyed: engines may outlive exit order
  return *users;
}

}  // namespace

bool cuda_built() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the non-sticky error left by a missing driver
    return 0;
  }
  return n;
}

bool cuda_available() { return cuda_device_count() > 0; }

std::unique_ptr<CopyEngine> make_gpu_copy_engine(const GpuCopyOptions& options) {
  return std::make_unique<GpuCopyEngine>(options);
}

GpuCopyEngine::GpuCopyEngine(const GpuCopyOptions& options) : options_(options) {
  const int count = cuda_device_count();
  if (count == 0) throw std::runtime_error("GpuCopyEngine: no CUDA device is usable (no GPU, or no driver)");
  if (options.device < 0 || options.device >= count) {
    throw std::invalid_argument("GpuCopyEngine: device " + std::to_string(options.device) + " does not exist (" +
                                std::to_string(count) + " CUDA devices)");
  }
  if (options.sms_h2d < 1 || options.sms_d2h < 1) {
    throw std::invalid_argument("GpuCopyEngine: transfer_sms_h2d and transfer_sms_d2h must be >= 1");
  }
  DeviceScope scope(options.device);
  try {
    int least = 0, greatest = 0;
    check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
    check(cudaStreamCreateWithPriority(&load_stream_, cudaStreamNonBlocking, greatest), "cudaStreamCreate");
    check(cudaStreamCreateWithPriority(&store_stream_, cudaStreamNonBlocking, least), "cudaStreamCreate");
    check(cudaStreamCreateWithPriority(&dma_[0], cudaStreamNonBlocking, greatest), "cudaStreamCreate");
    check(cudaStreamCreateWithPriority(&dma_[1], cudaStreamNonBlocking, least), "cudaStreamCreate");
    for (int lane = 0; lane < 2; ++lane) {
      for (int i = 0; i < kCeStreams; ++i) {
        check(cudaStreamCreateWithPriority(&aux_[lane][i], cudaStreamNonBlocking, lane == 0 ? greatest : least),
              "cudaStreamCreate");
      }
    }
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = options.device;
    check(cudaMemPoolCreate(&pool_, &props), "cudaMemPoolCreate");
    uint64_t keep = 64ull << 20;  // block lists of recent jobs stay allocated
    check(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
    // A load's block lists must never reuse memory a queued store frees later: the pool would make the load's
    // stream wait for that store, and a load would queue behind stores after all.
    int no = 0;
    check(cudaMemPoolSetAttribute(pool_, cudaMemPoolReuseAllowInternalDependencies, &no), "cudaMemPoolSetAttribute");
  } catch (...) {
    destroy_streams();  // no destructor runs for an engine whose constructor throws
    throw;
  }
#if CUDART_VERSION >= 12080
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  has_batch_memcpy_ = runtime >= 12080;
#endif
}

void GpuCopyEngine::destroy_streams() {
  free_rings();
  for (cudaStream_t& s : dma_) {
    if (s != nullptr) cudaStreamDestroy(s);
    s = nullptr;
  }
  for (auto& lane : aux_) {
    for (cudaStream_t& s : lane) {
      if (s != nullptr) cudaStreamDestroy(s);
      s = nullptr;
    }
  }
  if (load_stream_ != nullptr) cudaStreamDestroy(load_stream_);
  if (store_stream_ != nullptr) cudaStreamDestroy(store_stream_);
  if (pool_ != nullptr) cudaMemPoolDestroy(pool_);
  load_stream_ = store_stream_ = nullptr;
  pool_ = nullptr;
}

GpuCopyEngine::~GpuCopyEngine() {
  shut_down_registry();  // every callback has run: nothing refers to the streams any more
  DeviceScope scope(options_.device);
  destroy_streams();
}

void* GpuCopyEngine::stream(CopyDirection dir) const {
  return dir == CopyDirection::kHostToEngine ? load_stream_ : store_stream_;
}

CopyEngineBase::Pinned GpuCopyEngine::pin(uint64_t base, uint64_t bytes) {
  DeviceScope scope(options_.device);
  void* p = reinterpret_cast<void*>(base);
  std::lock_guard<std::mutex> lock(pinned_mu);
  auto shared = pinned_users().find(base);
  bool owned = true;
  if (shared == pinned_users().end()) {
    cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    if (err == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();  // pinned by someone else in this process: usable as it is, not ours to unpin
      owned = false;
    } else {
      check(err, "cudaHostRegister of the CPU tier");
    }
  }
  void* dev = nullptr;
  cudaError_t err = cudaHostGetDevicePointer(&dev, p, 0);
  if (err != cudaSuccess) {
    if (owned && shared == pinned_users().end()) cudaHostUnregister(p);
    check(err, "cudaHostGetDevicePointer");
  }
  if (owned) ++pinned_users()[base];
  return Pinned{reinterpret_cast<uint64_t>(dev), owned};
}

void GpuCopyEngine::unpin(uint64_t base, const Pinned& pinned) {
  if (!pinned.owned) return;
  std::lock_guard<std::mutex> lock(pinned_mu);
  auto it = pinned_users().find(base);
  if (it != pinned_users().end() && --it->second > 0) return;  // another engine of this process still copies
  if (it != pinned_users().end()) pinned_users().erase(it);
  DeviceScope scope(options_.device);
  cudaHostUnregister(reinterpret_cast<void*>(base));
}

std::shared_ptr<const void> GpuCopyEngine::prepare_layout(const Layout& l) {
  const EngineLayout& layout = l.layout;
  {
    DeviceScope scope(options_.device);
    for (size_t s = 0; s < layout.segments.size(); ++s) {
      const CopySegment& seg = layout.segments[s];
      const int64_t last = (layout.num_blocks - 1) * seg.engine_block_stride;
      const uint64_t lo = seg.engine_base + static_cast<uint64_t>(std::min<int64_t>(0, last));
      const uint64_t hi = seg.engine_base + static_cast<uint64_t>(std::max<int64_t>(0, last)) + seg.bytes - 1;
      for (uint64_t addr : {lo, hi}) {
        cudaPointerAttributes attr;
        cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(addr));
        if (err != cudaSuccess) {
          cudaGetLastError();
          throw std::invalid_argument("segment " + std::to_string(s) + " is not CUDA memory: " +
                                      cuda_message(err, "cudaPointerGetAttributes"));
        }
        if (attr.type != cudaMemoryTypeDevice || attr.device != options_.device) {
          throw std::invalid_argument("segment " + std::to_string(s) + " is not memory of CUDA device " +
                                      std::to_string(options_.device) +
                                      "; register KV tensors of the engine's device");
        }
      }
    }
  }
  auto data = std::make_shared<LayoutData>();
  data->order.resize(layout.segments.size());
  std::iota(data->order.begin(), data->order.end(), size_t{0});
  std::stable_sort(data->order.begin(), data->order.end(),
                   [&](size_t a, size_t b) { return layout.segments[a].group < layout.segments[b].group; });
  int vec = std::min(alignment_of(l.host_device_base), alignment_of(l.host.block_bytes));
  for (size_t s : data->order) {
    const CopySegment& c = layout.segments[s];
    data->segments.push_back(DeviceSegment{c.engine_base, c.engine_block_stride, c.host_offset, c.bytes});
    if (data->groups.empty() || data->groups.back().first != c.group) data->groups.push_back({c.group, 0});
    ++data->groups.back().second;
    vec = std::min({vec, alignment_of(c.engine_base),
                    alignment_of(static_cast<uint64_t>(std::llabs(c.engine_block_stride))),
                    alignment_of(c.host_offset), alignment_of(c.bytes)});
  }
  data->vector_bytes = vec;
  // Stageable when the segments tile the host block from offset 0 (one rank of the model, or MLA): the DMA
  // then moves whole blocks and writes no byte another rank owns.
  uint64_t covered = 0, lowest = UINT64_MAX;
  for (const CopySegment& c : layout.segments) {
    covered += c.bytes;
    lowest = std::min(lowest, c.host_offset);
    data->block_span = std::max(data->block_span, c.host_offset + c.bytes);
  }
  data->whole_block = !layout.segments.empty() && lowest == 0 && covered == data->block_span &&
                      data->block_span <= l.host.block_bytes;
  return data;
}

GpuCopyEngine::JobEvents::~JobEvents() {
  for (auto& e : events) cudaEventDestroy(e.second);
}

void CUDART_CB GpuCopyEngine::on_complete(void* p) {
  // No CUDA call and no lock but the pool's and the job table's, neither held by
  // anyone across a CUDA call.
  auto* c = static_cast<Completion*>(p);
  c->engine->staging_.give(c->staging);
  c->engine->jobs_.finish(c->job, std::move(c->error));  // the last use of the engine: it may go away next
  delete c;
}

namespace {
cudaEvent_t event_of_group(const std::vector<std::pair<int32_t, cudaEvent_t>>& events, int32_t group) {
  for (const auto& e : events) {
    if (e.first >= group) return e.second;
  }
  return events.back().second;
}
}  // namespace

void GpuCopyEngine::wait_group(uint64_t job, int32_t group) {
  auto events = std::static_pointer_cast<JobEvents>(jobs_.payload_if_running(job));
  if (events == nullptr) return;  // finished
  DeviceScope scope(options_.device);
  check(cudaEventSynchronize(event_of_group(events->events, group)), "cudaEventSynchronize");
}

void GpuCopyEngine::stream_wait_group(uint64_t job, int32_t group, void* stream) {
  auto events = std::static_pointer_cast<JobEvents>(jobs_.payload_if_running(job));
  if (events == nullptr) return;  // finished
  DeviceScope scope(options_.device);
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), event_of_group(events->events, group), 0),
        "cudaStreamWaitEvent");
}

}  // namespace flexkv
