// GpuCopyEngine: moves whole blocks between an engine's KV memory on one CUDA
// device and a host tier in pinned memory, on the engine's own CUDA streams.
//
// Two paths, chosen per direction:
//  - kKernel: a copy kernel on `sms` thread blocks, one warp per chunk, 16-byte
//    vector loads and stores (8, 4 or 1 bytes when the layout is not 16-byte
//    aligned), streaming cache hints. The host memory is read or written by the
//    SMs across PCIe, so it must be registered (register_host).
//  - kCopyEngine: the DMA engines, no SMs: cudaMemcpyBatchAsync where the CUDA
//    runtime has it (12.8+), split over several streams so that several DMA
//    engines work at once; otherwise one cudaMemcpyAsync per chunk. Adjacent
//    chunks are coalesced first. Fast for chunks of 64 KiB and more.
// kMemcpyPerChunk (one cudaMemcpyAsync per chunk, no coalescing) exists as the
// baseline benchmarks compare against.
//
// Loads (host to engine) run on a high-priority stream, stores on another, so a
// load never queues behind a store. A job completes in order on its stream;
// completion is reported by a host callback, so nothing polls.
//
// This header does not include CUDA's headers: streams cross it as void*.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "transfer/copy_layout.h"

namespace flexkv {

enum class GpuCopyPath { kKernel, kCopyEngine, kMemcpyPerChunk };

struct GpuCopyOptions {
  int device = 0;
  GpuCopyPath path_h2d = GpuCopyPath::kKernel;
  GpuCopyPath path_d2h = GpuCopyPath::kKernel;
  int sms_h2d = 8;  // thread blocks of the kernel path, host to engine
  int sms_d2h = 8;  // thread blocks of the kernel path, engine to host
};

// True when this build has CUDA support and a CUDA device is usable.
bool cuda_available();
// The number of CUDA devices (0 in a build without CUDA or without a driver).
int cuda_device_count();
// True when this build was compiled with CUDA.
bool cuda_built();

class GpuCopyEngine {
 public:
  // Throws std::runtime_error when the build has no CUDA, the device does not
  // exist, or an option is out of range.
  explicit GpuCopyEngine(const GpuCopyOptions& options);
  // Waits for every job, then unregisters the host memory it registered.
  ~GpuCopyEngine();
  GpuCopyEngine(const GpuCopyEngine&) = delete;
  GpuCopyEngine& operator=(const GpuCopyEngine&) = delete;

  const GpuCopyOptions& options() const { return options_; }

  // Pins [base, base + bytes) for this device (cudaHostRegister), once; a range
  // already registered by this engine is accepted again. Memory pinned by
  // someone else in this process is used as it is and never unpinned by the
  // engine. Every HostRegion a job names must lie inside a registered range.
  void register_host(uint64_t base, uint64_t bytes);
  // Forgets a range given to register_host, unpinning it if the engine pinned
  // it; waits for the jobs in flight first.
  void unregister_host(uint64_t base);

  // Checks that every segment lies in memory of this engine's device, that the
  // layout fits the host region, and the alignment. Cheap enough for
  // registration, too slow for every job (one driver query per segment).
  void check_device_layout(const EngineLayout& layout, const HostRegion& host) const;

  // Queues a copy of n blocks. Block ids are checked first; on a bad id or an
  // unregistered host region nothing is queued (std::out_of_range /
  // std::invalid_argument). Urgent jobs go on the high-priority stream. A
  // layer-wise job completes segment group by segment group and records an
  // event after each (wait_group, stream_wait_group). Returns a job id.
  uint64_t submit(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
                  const int64_t* engine_blocks, const int64_t* host_blocks, size_t n, bool urgent = false,
                  bool layerwise = false);

  // As HostCopyEngine: a job is collected once, by wait() or wait_any().
  bool wait(uint64_t job_id, int64_t timeout_us);
  uint64_t wait_any(int64_t timeout_us);
  bool done(uint64_t job_id);
  // The error of a job collected by wait/wait_any, once; "" when it succeeded.
  // A job whose CUDA work could not all be queued completes with an error.
  std::string take_error(uint64_t job_id);

  // Blocks the calling thread until segment group `group` of the job has been
  // copied (for a job that is not layer-wise: the whole job). A job already
  // collected has completed, so this returns at once for it.
  void wait_group(uint64_t job_id, int32_t group);
  // Makes `stream` (a cudaStream_t of this device) wait for that group, without
  // blocking the calling thread.
  void stream_wait_group(uint64_t job_id, int32_t group, void* stream);

  // Stream handles (cudaStream_t) the jobs run on.
  void* load_stream() const;
  void* store_stream() const;

 private:
  struct Job;
  struct Impl;
  struct Registration {
    uint64_t base;
    uint64_t bytes;
    uint64_t device_base;
    bool owned;  // pinned by this engine, so unpinned by it
  };
  static void on_job_done(void* job);
  void finish(Job* job);
  std::shared_ptr<Job> find_job(uint64_t job_id);
  uint64_t device_address_of_host(uint64_t host_base, uint64_t bytes) const;
  void drain();  // waits until no job is in flight

  GpuCopyOptions options_;
  std::unique_ptr<Impl> impl_;
  std::vector<Registration> registrations_;  // guarded by mu_
  mutable std::mutex mu_;
  std::condition_variable done_cv_;
  std::unordered_map<uint64_t, std::shared_ptr<Job>> jobs_;
  std::deque<uint64_t> finished_;
  std::unordered_map<uint64_t, std::string> errors_;
  uint64_t next_id_ = 1;
  size_t in_flight_ = 0;
};

}  // namespace flexkv
