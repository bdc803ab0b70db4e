// HostCopyEngine: the CopyEngine for engine KV memory in host RAM. A pool of
// threads moves whole blocks; a job is split into runs of (block, segment)
// chunks that the threads claim, urgent jobs before queued ones; a job of at
// most 1 MiB is copied by the submitting thread instead, before submit returns
// (still collected like any other). Chunks of 4
// KiB and more are copied with 32-byte (AVX2, where the CPU has it) or 16-byte
// loads and non-temporal stores, the next chunk's first lines prefetched. Built through
// make_host_copy_engine (copy_engine.h); declared here for its own tests.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transfer/copy_engine_base.h"

namespace flexkv {

class HostCopyEngine final : public CopyEngineBase {
 public:
  explicit HostCopyEngine(int num_threads);
  // Finishes the jobs already queued, then stops the threads.
  ~HostCopyEngine() override;
  HostCopyEngine(const HostCopyEngine&) = delete;
  HostCopyEngine& operator=(const HostCopyEngine&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()); }

  std::string name() const override { return "host"; }
  int device() const override { return -1; }
  uint64_t submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks, const int64_t* host_blocks,
                  size_t n, bool urgent, bool layerwise, uint64_t tag) override;
  // A job completes as a whole here: waits for the job.
  void wait_group(uint64_t job, int32_t group) override;
  [[noreturn]] void stream_wait_group(uint64_t job, int32_t group, void* stream) override;
  void* stream(CopyDirection) const override { return nullptr; }

 private:
  struct Job;
  Pinned pin(uint64_t base, uint64_t bytes) override;
  void unpin(uint64_t, const Pinned&) override {}
  std::shared_ptr<const void> prepare_layout(const Layout& layout) override;

  void worker_loop();
  void stop_workers();  // finishes queued jobs, joins the threads

  std::mutex mu_;  // the queues and every Job's claim counters
  std::condition_variable work_cv_;
  std::deque<std::shared_ptr<Job>> urgent_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

}  // namespace flexkv
