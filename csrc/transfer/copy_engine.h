// CopyEngine: the one interface of the engines that move whole blocks between
// an engine's KV memory and a host tier (the CPU tier or a worker's mapping of
// it). Two implementations: host threads (engine memory in host RAM) and the
// GPU data plane (engine memory on one CUDA device, the host tier pinned).
//
// Protocol:
//  - register_host(base, bytes) once per host tier the engine will touch (the
//    GPU engine pins it; the host engine only records it);
//  - register_layout(layout, host) once per engine layout: checked there (and
//    only there), so a submit costs no layout parsing or driver query; the host
//    region must lie inside a registered range;
//  - submit(dir, layout_id, engine_blocks, host_blocks, n, urgent, layerwise,
//    tag) queues a job and returns its id; block ids are range-checked first and
//    a bad one queues nothing;
//  - every job is collected exactly once: by wait(job) or by
//    next_completion(), which hands back the job's tag and its error text ("" on
//    success) in order of completion.
//
// All methods are thread-safe. No method holds an internal lock across a CUDA
// call that may block, and a completion callback takes no lock that a
// submitter holds across a CUDA call, so a callback never waits for a submitter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "transfer/copy_layout.h"

namespace flexkv {

struct CopyCompletion {
  uint64_t job = 0;
  uint64_t tag = 0;   // the tag given to submit()
  std::string error;  // "" when every byte arrived
};

class CopyEngine {
 public:
  // Waits for the jobs in flight (the host engine finishes its queued ones),
  // then unpins what the engine pinned.
  virtual ~CopyEngine() = default;

  // "host" or "cuda:<device>".
  virtual std::string name() const = 0;
  // -1 for the host engine, the CUDA device ordinal otherwise.
  virtual int device() const = 0;

  // A host range every layout's HostRegion must lie inside. The GPU engine pins
  // it (cudaHostRegister) unless someone else in the process already did; a
  // range inside one already registered is accepted, one that overlaps a
  // registered range without lying inside it is refused (std::invalid_argument).
  // unregister_host takes the base given to register_host: it forgets the
  // layouts whose host region lies in that range (a later submit on them throws
  // std::invalid_argument), waits for the jobs in flight, then unpins what this
  // engine pinned. Throws std::invalid_argument for a base never registered.
  virtual void register_host(uint64_t base, uint64_t bytes) = 0;
  virtual void unregister_host(uint64_t base) = 0;

  // Checks a layout against a host region once (segments inside a host block,
  // the host region inside a registered range; for the GPU engine also: every
  // segment in this device's memory) and returns its id (> 0, never reused).
  // Throws std::invalid_argument naming the first bad segment.
  virtual int32_t register_layout(const EngineLayout& layout, const HostRegion& host) = 0;
  // Forgets a layout; jobs already queued on it still run.
  virtual void unregister_layout(int32_t layout_id) = 0;

  // Queues a copy of block engine_blocks[i] <-> host_blocks[i], i < n. Urgent
  // jobs (loads an engine waits for) go ahead of queued non-urgent ones (stores).
  // A layer-wise job completes segment group by segment group (wait_group; the
  // host engine completes it as a whole). n == 0 queues a job that completes at
  // once. Throws std::out_of_range naming the first block id outside its range,
  // or std::invalid_argument for an unknown layout id, without queuing anything.
  // Once a job is queued, a failure of its copy (a CUDA error) does not throw:
  // the job completes with that error.
  virtual uint64_t submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks,
                          const int64_t* host_blocks, size_t n, bool urgent, bool layerwise, uint64_t tag) = 0;

  // Waits up to timeout_us (negative: no limit) for one job. True when it has
  // finished, and then collects it (*error, when given, receives its error, ""
  // on success); false on timeout. Throws std::out_of_range for a job never
  // submitted or already collected (also when another caller collects it
  // during the wait).
  virtual bool wait(uint64_t job, int64_t timeout_us, std::string* error = nullptr) = 0;
  // The next finished job not yet collected, in order of completion; waits up
  // to timeout_us (negative: no limit). nullopt on timeout or after interrupt().
  virtual std::optional<CopyCompletion> next_completion(int64_t timeout_us) = 0;
  // Makes the current and the next next_completion() call return nullopt at
  // once (until resume()); for a collector thread that is shutting down.
  virtual void interrupt() = 0;
  virtual void resume() = 0;
  // Jobs submitted and not yet finished.
  virtual size_t in_flight() const = 0;

  // Blocks until segment group `group` of the job has been copied (a job that
  // is not layer-wise: the whole job; a group past the last: the whole job).
  // Returns at once for a job that has finished, collected or not. Does not
  // collect the job. Throws std::out_of_range for a job never submitted.
  virtual void wait_group(uint64_t job, int32_t group) = 0;
  // Makes `stream` (a cudaStream_t of this device) wait for that group without
  // blocking the caller; nothing to do for a finished job. The host engine
  // throws std::logic_error.
  virtual void stream_wait_group(uint64_t job, int32_t group, void* stream) = 0;
  // The cudaStream_t (as void*) that the jobs of `dir` run on, for a caller
  // that orders its own CUDA work after them: kHostToEngine is the
  // high-priority load stream, which urgent jobs of either direction use too;
  // kEngineToHost the store stream. nullptr for the host engine.
  virtual void* stream(CopyDirection dir) const = 0;
};

// `threads` host threads (>= 1).
std::unique_ptr<CopyEngine> make_host_copy_engine(int threads);

// kStaged moves whole host blocks by DMA through a ring of device slots and
// scatters (gathers) them on the device; jobs it cannot stage (layer-wise, or a
// rank that holds only a slice of each host block) take kKernel.
enum class GpuCopyPath { kKernel, kCopyEngine, kMemcpyPerChunk, kStaged };

struct GpuCopyOptions {
  int device = 0;
  GpuCopyPath path_h2d = GpuCopyPath::kStaged;
  GpuCopyPath path_d2h = GpuCopyPath::kStaged;
  int sms_h2d = 8;  // thread blocks of the kernel path (and the staged path's scatter), host to engine
  int sms_d2h = 8;  // thread blocks of the kernel path (and the staged path's gather), engine to host
  uint64_t stage_slot_bytes = 8ull << 20;  // each of the staged path's 4 device slots per direction
};

// The GPU data plane on one device. Throws std::runtime_error when this build
// has no CUDA (saying how to get it) or no CUDA device is usable, and
// std::invalid_argument for a device that does not exist or an option out of range.
std::unique_ptr<CopyEngine> make_gpu_copy_engine(const GpuCopyOptions& options);

// True when this build has CUDA support and a CUDA device is usable.
bool cuda_available();
// The number of CUDA devices (0 in a build without CUDA or without a driver).
int cuda_device_count();
// True when this build was compiled with CUDA.
bool cuda_built();

}  // namespace flexkv
