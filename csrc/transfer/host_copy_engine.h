// HostCopyEngine: moves whole blocks between an engine's KV memory and the
// host tier with a pool of threads. Layouts are described in copy_layout.h.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "transfer/copy_layout.h"

namespace flexkv {

class HostCopyEngine {
 public:
  explicit HostCopyEngine(int num_threads);
  ~HostCopyEngine();
  HostCopyEngine(const HostCopyEngine&) = delete;
  HostCopyEngine& operator=(const HostCopyEngine&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()); }

  // Checks the layout against the host region (segments inside a host block,
  // block ids in range) and queues the copy. Urgent jobs (loads an engine waits
  // for) run before queued non-urgent ones (stores). Returns a job id.
  // Throws std::invalid_argument / std::out_of_range without queuing anything.
  uint64_t submit(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
                  const int64_t* engine_blocks, const int64_t* host_blocks, size_t n, bool urgent = false);

  // A job is collected once, by wait() or by wait_any().
  // wait: waits up to timeout_us (negative: forever) for this job. Returns true
  // when it has finished, and then forgets it; false on timeout. Unknown ids throw.
  bool wait(uint64_t job_id, int64_t timeout_us);
  // wait_any: waits up to timeout_us for any finished job not yet collected and
  // returns its id (forgetting it), in order of completion; 0 on timeout.
  uint64_t wait_any(int64_t timeout_us);
  // True when the job has finished (does not forget it).
  bool done(uint64_t job_id);

  // submit + wait, on the calling thread's behalf.
  void copy(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
            const int64_t* engine_blocks, const int64_t* host_blocks, size_t n);

  // Validates a layout against a host region once, e.g. at registration.
  static void validate(const EngineLayout& layout, const HostRegion& host);

 private:
  struct Job;
  void worker_loop();
  void run_items(Job& job, size_t begin, size_t end);
  void complete(Job& job);  // with mu_ held
  void shut_down();         // finishes queued jobs, joins the workers

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<std::shared_ptr<Job>> urgent_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::deque<uint64_t> finished_;  // completed, not yet collected, in order of completion
  std::unordered_map<uint64_t, std::shared_ptr<Job>> jobs_;
  std::vector<std::thread> workers_;
  uint64_t next_id_ = 1;
  bool stopping_ = false;
};

}  // namespace flexkv
