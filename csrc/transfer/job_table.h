// JobTable: the bookkeeping every copy engine shares. It hands out job ids,
// keeps each job's tag, records completions in the order they happen, and
// hands every finished job to exactly one collector (wait or next_completion).
//
// It never calls out while holding its mutex and finish() does nothing but
// take that mutex, so finish() is safe in a CUDA host callback and no caller
// of the table can block a callback for longer than a few map operations.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "transfer/copy_engine.h"

namespace flexkv {

class JobTable {
 public:
  JobTable() = default;
  ~JobTable();
  JobTable(const JobTable&) = delete;
  JobTable& operator=(const JobTable&) = delete;

  // A new job in flight. `payload` is what the engine keeps for the job (for
  // the GPU engine: its CUDA events); the table holds it until the job is
  // collected and drops it outside its mutex, on the collector's thread.
  uint64_t add(uint64_t tag, std::shared_ptr<void> payload = nullptr);

  // Ends a job in flight with its error ("" on success): it becomes the last
  // job in completion order. Takes only the table's mutex.
  void finish(uint64_t job, std::string error);

  // CopyEngine::wait / next_completion / interrupt / resume / in_flight.
  bool wait(uint64_t job, int64_t timeout_us, std::string* error);
  std::optional<CopyCompletion> next_completion(int64_t timeout_us);
  void interrupt();
  void resume();
  size_t in_flight() const;

  // Blocks until no job is in flight.
  void drain();
  // Blocks until the job has finished; does not collect it. Returns at once for
  // a finished or collected job. Throws std::out_of_range for an id never handed out.
  void wait_finished(uint64_t job);
  // Drops the payloads of the jobs not yet collected, leaving the jobs
  // collectable: for an engine's destructor, after drain(), before it frees
  // what the payloads refer to.
  void release_payloads();
  // The payload of a job still in flight; nullptr once it has finished
  // (collected or not). Throws std::out_of_range for an id never handed out.
  std::shared_ptr<void> payload_if_running(uint64_t job) const;

 private:
  struct Entry {
    uint64_t tag = 0;
    std::shared_ptr<void> payload;
    bool finished = false;
    std::string error;
  };
  void check_issued(uint64_t job) const;  // with mu_ held

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, Entry> jobs_;  // in flight, or finished and not yet collected
  // Finished jobs in completion order. A job collected by wait() stays here
  // until next_completion() skips it; `ready_` counts the uncollected ones.
  std::deque<uint64_t> order_;
  size_t ready_ = 0;
  size_t in_flight_ = 0;
  uint64_t next_id_ = 1;
  bool interrupted_ = false;
};

}  // namespace flexkv
