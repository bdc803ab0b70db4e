#include "transfer/gpu_copy_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>

#include "gpu_copy_kernels.h"

namespace flexkv {
namespace {

constexpr int32_t kWholeJob = INT32_MAX;  // the group id of a job that is not layer-wise

std::string cuda_message(cudaError_t err, const char* what) {
  return std::string(what) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(cuda_message(err, what));
}

// Selects the device for the calling thread for the scope, and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = -1;
    cudaGetDevice(&now);
    if (now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

// Pinned staging buffers for the block lists a job uploads, recycled after the
// job completes (cudaHostAlloc is far too slow to call per job).
class PinnedPool {
 public:
  ~PinnedPool() {
    for (auto& b : free_) cudaFreeHost(b.first);
  }
  std::pair<void*, size_t> take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second >= bytes && (best == free_.end() || it->second < best->second)) best = it;
      }
      if (best != free_.end()) {
        auto out = *best;
        free_.erase(best);
        return out;
      }
    }
    size_t size = 64 * 1024;
    while (size < bytes) size *= 2;
    void* p = nullptr;
    check(cudaHostAlloc(&p, size, cudaHostAllocPortable), "cudaHostAlloc (staging)");
    return {p, size};
  }
  // Called from CUDA's callback thread: no CUDA calls here.
  void give(std::pair<void*, size_t> b) {
    if (b.first == nullptr) return;
    std::lock_guard<std::mutex> g(mu_);
    free_.push_back(b);
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
};

int alignment_of(uint64_t v) {
  if (v % 16 == 0) return 16;
  if (v % 8 == 0) return 8;
  if (v % 4 == 0) return 4;
  return 1;
}

// The widest vector (16, 8, 4 or 1 bytes) that every address, stride and size of the job allows.
int vector_bytes(const EngineLayout& layout, uint64_t host_device_base, uint64_t host_stride) {
  int v = std::min(alignment_of(host_device_base), alignment_of(host_stride));
  for (const CopySegment& s : layout.segments) {
    v = std::min({v, alignment_of(s.engine_base), alignment_of(static_cast<uint64_t>(std::llabs(s.engine_block_stride))),
                  alignment_of(s.host_offset), alignment_of(s.bytes)});
  }
  return v;
}

// Segment indexes grouped by group id, ascending; one group when not layer-wise.
std::vector<std::pair<int32_t, std::vector<size_t>>> groups_of(const EngineLayout& layout, bool layerwise) {
  std::vector<size_t> order(layout.segments.size());
  std::iota(order.begin(), order.end(), size_t{0});
  if (!layerwise) return {{kWholeJob, order}};
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return layout.segments[a].group < layout.segments[b].group; });
  std::vector<std::pair<int32_t, std::vector<size_t>>> out;
  for (size_t s : order) {
    const int32_t g = layout.segments[s].group;
    if (out.empty() || out.back().first != g) out.push_back({g, {}});
    out.back().second.push_back(s);
  }
  return out;
}

struct Chunk {
  uint64_t dst;
  uint64_t src;
  uint64_t bytes;
};

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

// A copy-engine batch is split over this many streams: one batch keeps one DMA engine busy, and a small
// chunk costs it more time to set up than to move; several batches in parallel hide that.
constexpr int kCeStreams = 8;

struct GpuCopyEngine::Impl {
  cudaStream_t load_stream = nullptr;
  cudaStream_t store_stream = nullptr;
  cudaMemPool_t pool = nullptr;
  bool has_batch_memcpy = false;
  PinnedPool staging;
  // The split batches fork from and join the job's stream through these events, one set per direction;
  // fork_mu keeps one job's record-and-wait sequence from interleaving with another's.
  std::mutex fork_mu;
  cudaStream_t aux[2][kCeStreams] = {};
  cudaEvent_t fork[2] = {};
  cudaEvent_t join[2][kCeStreams] = {};
};

struct GpuCopyEngine::Job {
  uint64_t id = 0;
  GpuCopyEngine* engine = nullptr;
  std::vector<std::pair<int32_t, cudaEvent_t>> events;  // (group id, event recorded after it), ascending
  std::pair<void*, size_t> staging{nullptr, 0};
  bool complete = false;  // guarded by the engine's mutex
  std::string error;
  ~Job() {
    for (auto& e : events) cudaEventDestroy(e.second);
  }
};

GpuCopyEngine::GpuCopyEngine(const GpuCopyOptions& options) : options_(options), impl_(new Impl) {
  const int count = cuda_device_count();
  if (count == 0) {
    throw std::runtime_error("GpuCopyEngine: no CUDA device is usable (no GPU, or no driver)");
  }
  if (options.device < 0 || options.device >= count) {
    throw std::invalid_argument("GpuCopyEngine: device " + std::to_string(options.device) + " does not exist (" +
                                std::to_string(count) + " CUDA devices)");
  }
  if (options.sms_h2d < 1 || options.sms_d2h < 1) {
    throw std::invalid_argument("GpuCopyEngine: transfer_sms_h2d and transfer_sms_d2h must be >= 1");
  }
  DeviceScope scope(options.device);
  int least = 0, greatest = 0;
  check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange");
  check(cudaStreamCreateWithPriority(&impl_->load_stream, cudaStreamNonBlocking, greatest), "cudaStreamCreate");
  check(cudaStreamCreateWithPriority(&impl_->store_stream, cudaStreamNonBlocking, least), "cudaStreamCreate");
  cudaMemPoolProps props = {};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = options.device;
  check(cudaMemPoolCreate(&impl_->pool, &props), "cudaMemPoolCreate");
  uint64_t keep = 64ull << 20;  // block lists of recent jobs stay allocated
  check(cudaMemPoolSetAttribute(impl_->pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
#if CUDART_VERSION >= 12080
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  impl_->has_batch_memcpy = runtime >= 12080;
#endif
  for (int d = 0; d < 2; ++d) {
    check(cudaEventCreateWithFlags(&impl_->fork[d], cudaEventDisableTiming), "cudaEventCreate");
    for (int i = 0; i < kCeStreams; ++i) {
      check(cudaStreamCreateWithPriority(&impl_->aux[d][i], cudaStreamNonBlocking, d == 0 ? greatest : least),
            "cudaStreamCreate");
      check(cudaEventCreateWithFlags(&impl_->join[d][i], cudaEventDisableTiming), "cudaEventCreate");
    }
  }
}

GpuCopyEngine::~GpuCopyEngine() {
  drain();
  DeviceScope scope(options_.device);
  {
    std::lock_guard<std::mutex> g(mu_);
    jobs_.clear();
    for (const Registration& r : registrations_) {
      if (r.owned) cudaHostUnregister(reinterpret_cast<void*>(r.base));
    }
    registrations_.clear();
  }
  for (int d = 0; d < 2; ++d) {
    cudaEventDestroy(impl_->fork[d]);
    for (int i = 0; i < kCeStreams; ++i) {
      cudaStreamDestroy(impl_->aux[d][i]);
      cudaEventDestroy(impl_->join[d][i]);
    }
  }
  cudaStreamDestroy(impl_->load_stream);
  cudaStreamDestroy(impl_->store_stream);
  cudaMemPoolDestroy(impl_->pool);
}

void GpuCopyEngine::drain() {
  std::unique_lock<std::mutex> g(mu_);
  done_cv_.wait(g, [&] { return in_flight_ == 0; });
}

void* GpuCopyEngine::load_stream() const { return impl_->load_stream; }
void* GpuCopyEngine::store_stream() const { return impl_->store_stream; }

void GpuCopyEngine::register_host(uint64_t base, uint64_t bytes) {
  if (base == 0 || bytes == 0) throw std::invalid_argument("register_host: empty range");
  std::lock_guard<std::mutex> g(mu_);
  for (const Registration& r : registrations_) {
    if (base >= r.base && base + bytes <= r.base + r.bytes) return;
    if (base < r.base + r.bytes && r.base < base + bytes) {
      throw std::invalid_argument("register_host: the range overlaps a registered range without lying inside it");
    }
  }
  DeviceScope scope(options_.device);
  void* p = reinterpret_cast<void*>(base);
  cudaError_t err = cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (err == cudaErrorHostMemoryAlreadyRegistered) {
    cudaGetLastError();  // registered by someone else in this process: usable as it is, not ours to unregister
    void* dev = nullptr;
    check(cudaHostGetDevicePointer(&dev, p, 0), "cudaHostGetDevicePointer");
    registrations_.push_back({base, bytes, reinterpret_cast<uint64_t>(dev), false});
    return;
  }
  check(err, "cudaHostRegister of the CPU tier");
  void* dev = nullptr;
  err = cudaHostGetDevicePointer(&dev, p, 0);
  if (err != cudaSuccess) {
    cudaHostUnregister(p);
    check(err, "cudaHostGetDevicePointer");
  }
  registrations_.push_back({base, bytes, reinterpret_cast<uint64_t>(dev), true});
}

void GpuCopyEngine::unregister_host(uint64_t base) {
  drain();
  std::lock_guard<std::mutex> g(mu_);
  for (auto it = registrations_.begin(); it != registrations_.end(); ++it) {
    if (it->base == base) {
      DeviceScope scope(options_.device);
      if (it->owned) cudaHostUnregister(reinterpret_cast<void*>(base));
      registrations_.erase(it);
      return;
    }
  }
  throw std::invalid_argument("unregister_host: no range registered at this address");
}

uint64_t GpuCopyEngine::device_address_of_host(uint64_t host_base, uint64_t bytes) const {
  for (const Registration& r : registrations_) {
    if (host_base >= r.base && host_base + bytes <= r.base + r.bytes) return r.device_base + (host_base - r.base);
  }
  throw std::invalid_argument("the host region is not registered with the GPU copy engine; call register_host on "
                              "the CPU tier's memory first");
}

void GpuCopyEngine::check_device_layout(const EngineLayout& layout, const HostRegion& host) const {
  validate_layout(layout, host);
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
                                    std::to_string(options_.device) + "; register KV tensors of the engine's device");
      }
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  device_address_of_host(host.base, host.block_bytes * static_cast<uint64_t>(host.num_blocks));
}

uint64_t GpuCopyEngine::submit(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
                               const int64_t* engine_blocks, const int64_t* host_blocks, size_t n, bool urgent,
                               bool layerwise) {
  validate_layout(layout, host);
  check_block_ids(layout, host, engine_blocks, host_blocks, n);
  const bool h2d = dir == CopyDirection::kHostToEngine;
  const GpuCopyPath path = h2d ? options_.path_h2d : options_.path_d2h;
  const int sms = h2d ? options_.sms_h2d : options_.sms_d2h;
  cudaStream_t stream = urgent || h2d ? impl_->load_stream : impl_->store_stream;
  uint64_t host_device_base;
  {
    std::lock_guard<std::mutex> g(mu_);
    host_device_base = device_address_of_host(host.base, host.block_bytes * static_cast<uint64_t>(host.num_blocks));
  }
  DeviceScope scope(options_.device);
  auto job = std::make_shared<Job>();
  job->engine = this;
  const auto groups = groups_of(layout, layerwise);
  for (const auto& grp : groups) {
    cudaEvent_t ev;
    check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    job->events.push_back({grp.first, ev});
  }

  // Nothing is queued before this point; from here on a failure ends the job with an error
  // and the work already queued still completes before the job does.
  std::string error;
  if (n > 0 && path == GpuCopyPath::kKernel) {
    const size_t nseg = layout.segments.size();
    const size_t bytes = nseg * sizeof(DeviceSegment) + 2 * n * sizeof(int64_t);
    job->staging = impl_->staging.take(bytes);
    auto* segs = static_cast<DeviceSegment*>(job->staging.first);
    size_t k = 0;
    for (const auto& grp : groups) {
      for (size_t s : grp.second) {
        const CopySegment& c = layout.segments[s];
        segs[k++] = DeviceSegment{c.engine_base, c.engine_block_stride, c.host_offset, c.bytes};
      }
    }
    auto* blocks = reinterpret_cast<int64_t*>(segs + nseg);
    std::copy(engine_blocks, engine_blocks + n, blocks);
    std::copy(host_blocks, host_blocks + n, blocks + n);
    const int vec = vector_bytes(layout, host_device_base, host.block_bytes);
    void* dev = nullptr;
    cudaError_t err = cudaMallocFromPoolAsync(&dev, bytes, impl_->pool, stream);
    if (err != cudaSuccess) {
      impl_->staging.give(job->staging);
      check(err, "cudaMallocFromPoolAsync (block lists)");
    }
    err = cudaMemcpyAsync(dev, job->staging.first, bytes, cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) error = cuda_message(err, "cudaMemcpyAsync (block lists)");
    const auto* dsegs = static_cast<const DeviceSegment*>(dev);
    const auto* deng = reinterpret_cast<const int64_t*>(dsegs + nseg);
    size_t first = 0;
    for (size_t g = 0; g < groups.size(); ++g) {
      const size_t count = groups[g].second.size();
      if (error.empty()) {
        const int64_t items = static_cast<int64_t>(count * n);
        const int64_t warps_per_block = kCopyThreadsPerBlock / 32;
        const int grid = static_cast<int>(std::min<int64_t>(sms, (items + warps_per_block - 1) / warps_per_block));
        err = launch_block_copy(h2d, vec, grid, stream, dsegs + first, static_cast<int>(count), deng, deng + n,
                                static_cast<int64_t>(n), host_device_base, host.block_bytes);
        if (err != cudaSuccess) error = cuda_message(err, "block copy kernel launch");
      }
      first += count;
      cudaEventRecord(job->events[g].second, stream);
    }
    cudaFreeAsync(dev, stream);
  } else if (n > 0) {
    for (size_t g = 0; g < groups.size(); ++g) {
      std::vector<Chunk> chunks;
      chunks.reserve(groups[g].second.size() * n);
      for (size_t s : groups[g].second) {
        const CopySegment& c = layout.segments[s];
        for (size_t i = 0; i < n; ++i) {
          const uint64_t eng = c.engine_base + engine_blocks[i] * c.engine_block_stride;
          const uint64_t hst = host.base + static_cast<uint64_t>(host_blocks[i]) * host.block_bytes + c.host_offset;
          Chunk ch = h2d ? Chunk{eng, hst, c.bytes} : Chunk{hst, eng, c.bytes};
          if (path == GpuCopyPath::kCopyEngine && !chunks.empty() && chunks.back().dst + chunks.back().bytes == ch.dst &&
              chunks.back().src + chunks.back().bytes == ch.src) {
            chunks.back().bytes += ch.bytes;
          } else {
            chunks.push_back(ch);
          }
        }
      }
      if (!error.empty()) {
        cudaEventRecord(job->events[g].second, stream);
        continue;
      }
      const cudaMemcpyKind kind = h2d ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
#if CUDART_VERSION >= 12080
      if (path == GpuCopyPath::kCopyEngine && impl_->has_batch_memcpy) {
        std::vector<void*> dsts(chunks.size());
        std::vector<const void*> srcs(chunks.size());
        std::vector<size_t> sizes(chunks.size());
        for (size_t i = 0; i < chunks.size(); ++i) {
          dsts[i] = reinterpret_cast<void*>(chunks[i].dst);
          srcs[i] = reinterpret_cast<const void*>(chunks[i].src);
          sizes[i] = chunks[i].bytes;
        }
        cudaMemcpyAttributes attr = {};
        attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
        attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
        const int d = h2d ? 0 : 1;
        const size_t parts = std::min<size_t>(kCeStreams, chunks.size());
        std::lock_guard<std::mutex> fork_guard(impl_->fork_mu);
        if (parts > 1) cudaEventRecord(impl_->fork[d], stream);
        for (size_t p = 0; p < parts && error.empty(); ++p) {
          const size_t lo = chunks.size() * p / parts, hi = chunks.size() * (p + 1) / parts;
          cudaStream_t st = stream;
          if (parts > 1) {
            st = impl_->aux[d][p];
            cudaStreamWaitEvent(st, impl_->fork[d], 0);
          }
          size_t attr_index = 0;
#if CUDART_VERSION >= 13000
          cudaError_t err = cudaMemcpyBatchAsync(dsts.data() + lo, srcs.data() + lo, sizes.data() + lo, hi - lo, &attr,
                                                 &attr_index, 1, st);
#else
          size_t fail_index = 0;
          cudaError_t err = cudaMemcpyBatchAsync(dsts.data() + lo, const_cast<void**>(srcs.data()) + lo,
                                                 sizes.data() + lo, hi - lo, &attr, &attr_index, 1, &fail_index, st);
#endif
          if (err != cudaSuccess) error = cuda_message(err, "cudaMemcpyBatchAsync");
          if (parts > 1) {
            cudaEventRecord(impl_->join[d][p], st);
            cudaStreamWaitEvent(stream, impl_->join[d][p], 0);
          }
        }
      } else
#endif
      {
        for (const Chunk& c : chunks) {
          cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(c.dst), reinterpret_cast<const void*>(c.src),
                                            c.bytes, kind, stream);
          if (err != cudaSuccess) {
            error = cuda_message(err, "cudaMemcpyAsync");
            break;
          }
        }
      }
      cudaEventRecord(job->events[g].second, stream);
    }
  } else {
    for (auto& e : job->events) cudaEventRecord(e.second, stream);
  }
  job->error = error;

  std::lock_guard<std::mutex> g(mu_);
  job->id = next_id_++;
  jobs_[job->id] = job;
  ++in_flight_;
  cudaError_t err = cudaLaunchHostFunc(stream, &GpuCopyEngine::on_job_done, job.get());
  if (err != cudaSuccess) {
    // The callback will never run: wait for the stream here so the job can complete now.
    if (job->error.empty()) job->error = cuda_message(err, "cudaLaunchHostFunc");
    cudaStreamSynchronize(stream);
    job->complete = true;
    --in_flight_;
    impl_->staging.give(job->staging);
    job->staging = {nullptr, 0};
    finished_.push_back(job->id);
    done_cv_.notify_all();
  }
  return job->id;
}

void GpuCopyEngine::on_job_done(void* p) {
  Job* job = static_cast<Job*>(p);
  job->engine->finish(job);
}

void GpuCopyEngine::finish(Job* job) {
  impl_->staging.give(job->staging);
  std::lock_guard<std::mutex> g(mu_);
  job->staging = {nullptr, 0};
  job->complete = true;
  --in_flight_;
  finished_.push_back(job->id);
  done_cv_.notify_all();
}

std::shared_ptr<GpuCopyEngine::Job> GpuCopyEngine::find_job(uint64_t job_id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) return it->second;
  if (job_id == 0 || job_id >= next_id_) throw std::out_of_range("unknown copy job " + std::to_string(job_id));
  return nullptr;  // collected, so complete
}

bool GpuCopyEngine::wait(uint64_t job_id, int64_t timeout_us) {
  std::unique_lock<std::mutex> g(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) throw std::out_of_range("unknown or already collected copy job " + std::to_string(job_id));
  std::shared_ptr<Job> job = it->second;
  auto ready = [&] { return job->complete; };
  if (timeout_us < 0) {
    done_cv_.wait(g, ready);
  } else if (!done_cv_.wait_for(g, std::chrono::microseconds(timeout_us), ready)) {
    return false;
  }
  finished_.erase(std::find(finished_.begin(), finished_.end(), job_id));
  if (!job->error.empty()) errors_[job_id] = job->error;
  jobs_.erase(job_id);
  return true;
}

uint64_t GpuCopyEngine::wait_any(int64_t timeout_us) {
  std::unique_lock<std::mutex> g(mu_);
  auto ready = [&] { return !finished_.empty(); };
  if (timeout_us < 0) {
    done_cv_.wait(g, ready);
  } else if (!done_cv_.wait_for(g, std::chrono::microseconds(timeout_us), ready)) {
    return 0;
  }
  const uint64_t id = finished_.front();
  finished_.pop_front();
  auto it = jobs_.find(id);
  if (!it->second->error.empty()) errors_[id] = it->second->error;
  jobs_.erase(it);
  return id;
}

bool GpuCopyEngine::done(uint64_t job_id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) throw std::out_of_range("unknown or already collected copy job " + std::to_string(job_id));
  return it->second->complete;
}

std::string GpuCopyEngine::take_error(uint64_t job_id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = errors_.find(job_id);
  if (it == errors_.end()) return "";
  std::string e = std::move(it->second);
  errors_.erase(it);
  return e;
}

namespace {
cudaEvent_t event_of_group(const std::vector<std::pair<int32_t, cudaEvent_t>>& events, int32_t group) {
  for (const auto& e : events) {
    if (e.first >= group) return e.second;
  }
  return events.back().second;
}
}  // namespace

void GpuCopyEngine::wait_group(uint64_t job_id, int32_t group) {
  std::shared_ptr<Job> job = find_job(job_id);
  if (job == nullptr) return;
  DeviceScope scope(options_.device);
  check(cudaEventSynchronize(event_of_group(job->events, group)), "cudaEventSynchronize");
}

void GpuCopyEngine::stream_wait_group(uint64_t job_id, int32_t group, void* stream) {
  std::shared_ptr<Job> job = find_job(job_id);
  if (job == nullptr) return;
  DeviceScope scope(options_.device);
  check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), event_of_group(job->events, group), 0),
        "cudaStreamWaitEvent");
}

}  // namespace flexkv
