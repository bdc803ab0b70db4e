// CopyEngineBase: what the host and the GPU copy engines share besides the
// bytes they move: the job table, the registered host ranges and the
// registered layouts. An engine supplies three hooks (pin, unpin,
// prepare_layout) and submit; this class keeps the rules:
//  - a hook runs with no lock held (pin and prepare_layout may call CUDA);
//  - a range being pinned or unpinned is marked pending, so a second
//    registration of an overlapping range waits for it instead of racing it;
//  - a job is counted in flight (add_job) only while its layout is still
//    registered, so unregister_host, which forgets the range's layouts first
//    and then drains, never unpins memory a job can still touch.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "transfer/copy_engine.h"
#include "transfer/copy_layout.h"
#include "transfer/job_table.h"

namespace flexkv {

class CopyEngineBase : public CopyEngine {
 public:
  void register_host(uint64_t base, uint64_t bytes) final;
  void unregister_host(uint64_t base) final;
  int32_t register_layout(const EngineLayout& layout, const HostRegion& host) final;
  void unregister_layout(int32_t layout_id) final;

  bool wait(uint64_t job, int64_t timeout_us, std::string* error = nullptr) final;
  std::optional<CopyCompletion> next_completion(int64_t timeout_us) final;
  void interrupt() final;
  void resume() final;
  size_t in_flight() const final;

 protected:
  struct Pinned {
    uint64_t device_base = 0;  // the range's first byte as the engine's copies address it
    bool owned = false;        // pinned by this engine, so unpinned by it
  };
  struct Layout {
    EngineLayout layout;
    HostRegion host;
    uint64_t host_device_base = 0;  // host.base as the engine's copies address it
    std::shared_ptr<const void> engine_data;  // what prepare_layout made of it
  };

  // Makes [base, base + bytes) usable by the engine's copies. Throws on failure.
  virtual Pinned pin(uint64_t base, uint64_t bytes) = 0;
  virtual void unpin(uint64_t base, const Pinned& pinned) = 0;
  // The engine's own checks of a layout (validate_layout has passed) and what it
  // keeps of it for its submits. Throws std::invalid_argument naming the cause.
  virtual std::shared_ptr<const void> prepare_layout(const Layout& layout) = 0;

  // The layout registered under an id. Throws std::invalid_argument for an id
  // never registered or forgotten.
  std::shared_ptr<const Layout> find_layout(int32_t layout_id) const;
  // Counts a job in flight on a layout and returns its id, unless the layout
  // has been forgotten since find_layout: then std::invalid_argument, and
  // nothing is added.
  uint64_t add_job(int32_t layout_id, uint64_t tag, std::shared_ptr<void> payload = nullptr);
  // For an engine's destructor, before it frees what its jobs use: waits for
  // every job in flight, drops the layouts and the jobs' payloads, unpins every
  // range. Call it once.
  void shut_down_registry();

  JobTable jobs_;

 private:
  struct Range {
    uint64_t base = 0;
    uint64_t bytes = 0;
    Pinned pinned;
    uint64_t generation = 0;  // distinguishes two registrations of the same base
    bool pending = false;     // being pinned or unpinned: usable by nothing yet
  };
  // With mu_ held: the range holding [base, base + bytes), ready or pending; nullptr if none.
  Range* range_containing(uint64_t base, uint64_t bytes);
  bool overlaps_pending(uint64_t base, uint64_t bytes) const;

  mutable std::mutex mu_;
  std::condition_variable ranges_cv_;  // a pending range became ready or went away
  std::vector<Range> ranges_;
  std::unordered_map<int32_t, std::shared_ptr<const Layout>> layouts_;
  std::unordered_map<int32_t, uint64_t> layout_range_;  // layout id -> generation of its range
  int32_t next_layout_ = 1;
  uint64_t next_generation_ = 1;
};

}  // namespace flexkv
