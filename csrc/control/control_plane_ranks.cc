// ControlPlane: KV memory in other processes (tensor-parallel ranks), whose
// copies are orders a dispatcher hands to the ranks (transfer/rank_order_engine.h).
#include <chrono>
#include <memory>
#include <string>
#include <thread>

#include "control/control_plane.h"
#include "flexkv/errors.h"

namespace flexkv {

int32_t ControlPlane::register_rank_layout(int64_t num_blocks) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("register_rank_layout");
  }
  if (num_blocks <= 0) throw LayoutError("the ranks' KV memory must have at least one block");
  std::shared_ptr<RankOrderEngine> engine;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    if (!rank_engine_) {
      rank_engine_ = std::make_shared<RankOrderEngine>();
      Engine& slot = engines_[kRankDevice];
      slot.engine = rank_engine_;
      CopyEngine* raw = rank_engine_.get();
      slot.collector = std::thread([this, raw] { collect(raw); });
    }
    engine = rank_engine_;
  }
  EngineLayout layout;
  layout.num_blocks = num_blocks;
  const int32_t id = engine->register_layout(layout, cpu_->region());
  std::lock_guard<std::mutex> g(engines_mu_);
  const int32_t handle = next_layout_++;
  layouts_[handle] = Layout{engine.get(), id, num_blocks, false};
  return handle;
}

std::optional<RankOrder> ControlPlane::next_rank_order(int64_t timeout_us) {
  std::shared_ptr<RankOrderEngine> engine;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    engine = rank_engine_;
  }
  if (!engine) {
    if (timeout_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(timeout_us));
    return std::nullopt;
  }
  return engine->next_order(timeout_us);
}

void ControlPlane::finish_rank_order(uint64_t job, const std::string& error) {
  std::shared_ptr<RankOrderEngine> engine;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    engine = rank_engine_;
  }
  if (engine) engine->finish(job, error);
}

}  // namespace flexkv
