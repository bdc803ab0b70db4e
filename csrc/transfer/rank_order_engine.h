// RankOrderEngine: the CopyEngine of KV memory that lives in other processes
// (the tensor-parallel ranks of an engine, each with its own data plane). A
// submit does not move bytes: it queues an order that a dispatcher takes
// (next_order) and sends to the ranks; when every rank has copied its slice the
// dispatcher finishes the job (finish), and the control plane's collector sees
// it complete like any other copy. So promotion, waits, cancellation and the
// task states stay the control plane's, for ranks in any process.
//
// A job completes as a whole (wait_group waits for the job). The destructor
// fails the jobs still in flight: ranks that never answer must not hang a
// shutdown (a rank still copying writes into its own mapping of the tier).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "transfer/copy_engine.h"
#include "transfer/job_table.h"

namespace flexkv {

struct RankOrder {
  uint64_t job = 0;
  uint64_t tag = 0;  // the submit's tag (the control plane's task id)
  int32_t layout_id = 0;
  CopyDirection direction = CopyDirection::kHostToEngine;
  bool layerwise = false;
  std::vector<int64_t> engine_blocks;
  std::vector<int64_t> host_blocks;
};

class RankOrderEngine final : public CopyEngine {
 public:
  RankOrderEngine() = default;
  ~RankOrderEngine() override;
  RankOrderEngine(const RankOrderEngine&) = delete;
  RankOrderEngine& operator=(const RankOrderEngine&) = delete;

  std::string name() const override { return "ranks"; }
  int device() const override { return -2; }
  // The ranks map the host tier themselves: ranges are recorded for the id checks only.
  void register_host(uint64_t base, uint64_t bytes) override;
  void unregister_host(uint64_t base) override;
  // Only num_blocks of the layout and the host region's block count are used (each rank
  // registers its own segments with its own data plane).
  int32_t register_layout(const EngineLayout& layout, const HostRegion& host) override;
  void unregister_layout(int32_t layout_id) override;
  uint64_t submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks, const int64_t* host_blocks,
                  size_t n, bool urgent, bool layerwise, uint64_t tag) override;
  bool wait(uint64_t job, int64_t timeout_us, std::string* error = nullptr) override;
  std::optional<CopyCompletion> next_completion(int64_t timeout_us) override;
  void interrupt() override;
  void resume() override;
  size_t in_flight() const override;
  void wait_group(uint64_t job, int32_t group) override;
  [[noreturn]] void stream_wait_group(uint64_t job, int32_t group, void* stream) override;
  void* stream(CopyDirection) const override { return nullptr; }

  // The next order not yet taken, urgent ones (loads) first; waits up to
  // timeout_us (negative: no limit). nullopt on timeout or once closed.
  std::optional<RankOrder> next_order(int64_t timeout_us);
  // Ends a job taken by next_order: "" when every rank copied its slice.
  // Unknown or finished jobs are ignored (a shutdown may have failed it).
  void finish(uint64_t job, const std::string& error);
  // Fails the jobs still open, drops the queued orders and wakes next_order
  // (which then returns nullopt); later submits throw. Idempotent.
  void close();

 private:
  struct LayoutInfo {
    int64_t num_blocks = 0;
    int64_t host_blocks = 0;
  };
  mutable std::mutex mu_;
  std::condition_variable orders_cv_;
  std::deque<RankOrder> urgent_;
  std::deque<RankOrder> orders_;
  std::unordered_map<int32_t, LayoutInfo> layouts_;
  std::unordered_map<uint64_t, bool> open_jobs_;  // submitted and not finished
  int32_t next_layout_ = 1;
  bool closed_ = false;
  JobTable jobs_;
};

}  // namespace flexkv
