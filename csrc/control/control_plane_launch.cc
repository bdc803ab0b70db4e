// ControlPlane: launch (copies by this plane's engines), take and complete
// (copies made elsewhere), cancel.
#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "control/control_plane.h"
#include "control/log.h"
#include "control/plane_util.h"
#include "flexkv/errors.h"

namespace flexkv {

std::vector<int64_t> ControlPlane::engine_blocks_of(const Task& t, const EngineTargets& targets,
                                                    const Layout* layout) const {
  const std::string who = "task " + id_text(t.id) + ": ";
  if (!targets.error.empty()) throw TaskError(who + targets.error);
  const auto tpb = static_cast<size_t>(options_.tokens_per_block);
  const size_t want = targets.slots ? t.promised * tpb : t.promised;
  if (targets.n != want) {
    if (targets.slots) {
      throw TaskError(who + "slot_mapping has " + std::to_string(targets.n) + " slots but the task's mask marks " +
                      std::to_string(want) + " tokens");
    }
    throw TaskError(who + std::to_string(targets.n) + " engine blocks for the " + std::to_string(want) +
                    " blocks it moves");
  }
  if (want == 0) return {};
  if (layout == nullptr) throw TaskError("launch: no KV memory registered; call register_kv_caches first");
  std::vector<int64_t> blocks(t.promised);
  if (targets.slots) {
    // Branch-free: any slot off its block's run sets a bit of `off`; the inner loop vectorizes.
    const auto tpb_i = static_cast<int64_t>(tpb);
    uint64_t off = 0;
    for (size_t b = 0; b < t.promised; ++b) {
      const int64_t* s = targets.data + b * tpb;
      const int64_t first = s[0];
      off |= static_cast<uint64_t>(first < 0) | static_cast<uint64_t>(first % tpb_i);
      for (size_t k = 1; k < tpb; ++k) off |= static_cast<uint64_t>(s[k] ^ (first + static_cast<int64_t>(k)));
      blocks[b] = first / tpb_i;
    }
    if (off != 0) {
      throw TaskError(who + "slot_mapping must give each block's tokens consecutive slots starting at a multiple "
                      "of tokens_per_block=" + std::to_string(tpb));
    }
  } else {
    blocks.assign(targets.data, targets.data + targets.n);
  }
  const auto [lo, hi] = std::minmax_element(blocks.begin(), blocks.end());
  if (*lo < 0 || *hi >= layout->num_blocks) {
    throw TaskError(who + (targets.slots ? "slot_mapping addresses" : "engine_blocks address") + " engine blocks " +
                    std::to_string(*lo) + ".." + std::to_string(*hi) + ", the registered KV memory has blocks 0.." +
                    std::to_string(layout->num_blocks - 1));
  }
  if (t.kind == TaskKind::kGet && !std::is_sorted(blocks.begin(), blocks.end(), std::less_equal<int64_t>())) {
    // Not strictly ascending (the common case is): look for a block loaded twice.
    std::vector<int64_t> sorted = blocks;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      throw TaskError(who + (targets.slots ? "slot_mapping" : "engine_blocks") +
                      " loads two blocks into the same engine block");
    }
  }
  return blocks;
}

// ------------------------------------------------------------------- launch

void ControlPlane::launch(const std::vector<TaskId>& ids, const std::vector<EngineTargets>& targets, int32_t layout,
                          bool layerwise) {
  if (ids.size() != targets.size()) {
    throw TaskError("launch: " + std::to_string(ids.size()) + " task ids but " + std::to_string(targets.size()) +
                    " slot mappings");
  }
  // Claimed tasks stay in the table while claimed; a task with nothing to move (complete since its match)
  // may be reported and forgotten by another thread at any time, so tasks are found again by id below.
  std::vector<TaskId> claimed;
  std::vector<Task> views;  // what validation needs, copied while claimed
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("launch");
    std::vector<Task*> tasks;
    for (TaskId id : ids) {
      Task* t = find(id);
      if (t == nullptr) throw TaskError("launch: unknown task id " + id_text(id));
      if (!t->launchable() || std::find(tasks.begin(), tasks.end(), t) != tasks.end()) {
        throw TaskError("launch: task " + id_text(id) + " is " + stage_name(t->state) +
                        " and was launched before; a task is launched once, after get_match or put_match");
      }
      tasks.push_back(t);
    }
    for (Task* t : tasks) {
      t->launched = Task::Clock::now();
      t->layout = layout;
      t->layerwise = layerwise;
      if (t->state != TaskStage::kDone) t->move_to(TaskStage::kClaimed);
      claimed.push_back(t->id);
      Task view;
      view.id = t->id;
      view.kind = t->kind;
      view.promised = t->promised;
      views.push_back(std::move(view));
    }
    ++launching_;
  }
  struct Release {
    ControlPlane* self;
    ~Release() {
      {
        std::lock_guard<std::mutex> g(self->mu_);
        --self->launching_;
      }
      self->cv_.notify_all();
    }
  } release{this};

  Layout found;
  bool have_layout = false;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    auto it = layouts_.find(layout);
    if (it != layouts_.end()) {
      found = it->second;
      have_layout = true;
    }
  }
  std::vector<std::vector<int64_t>> plans(claimed.size());
  try {
    for (size_t k = 0; k < claimed.size(); ++k) {
      plans[k] = engine_blocks_of(views[k], targets[k], have_layout ? &found : nullptr);
    }
  } catch (const TaskError& e) {
    // A bad argument: no copy starts, and every task of the call ends FAILED.
    const std::string why = std::string("launch failed: ") + e.what();
    for (TaskId id : claimed) {
      std::unique_lock<std::mutex> lock(mu_);
      Task* t = find_any(id);
      if (t == nullptr || t->state != TaskStage::kClaimed) continue;
      if (t->promotion) {  // its SSD reads still write into its CPU blocks: they end it
        t->ending = Outcome{TaskStage::kFailed, why};
        t->move_to(TaskStage::kEndingAfterPromotion);
        continue;
      }
      t->move_to(TaskStage::kFinishing);
      lock.unlock();
      end(t, Outcome{TaskStage::kFailed, why});
    }
    throw;
  }
  for (size_t k = 0; k < claimed.size(); ++k) {
    std::unique_lock<std::mutex> lock(mu_);
    Task* t = find_any(claimed[k]);
    if (t == nullptr || t->state != TaskStage::kClaimed) continue;  // nothing to copy: complete since the match
    t->plan = std::move(plans[k]);
    if (t->promotion) {
      t->move_to(TaskStage::kWaitingForPromotion);  // submitted once its blocks are in the CPU tier
      continue;
    }
    try {
      submit_copy(t, lock);
    } catch (const TaskError&) {
      // The copy engine refused: the tasks not yet queued end too.
      for (size_t r = k + 1; r < claimed.size(); ++r) {
        std::unique_lock<std::mutex> l2(mu_);
        Task* rest = find_any(claimed[r]);
        if (rest == nullptr || rest->state != TaskStage::kClaimed) continue;
        if (rest->promotion) {
          rest->ending = Outcome{TaskStage::kFailed, "launch failed: the copy engine refused an earlier task"};
          rest->move_to(TaskStage::kEndingAfterPromotion);
          continue;
        }
        rest->move_to(TaskStage::kFinishing);
        l2.unlock();
        end(rest, Outcome{TaskStage::kFailed, "launch failed: the copy engine refused an earlier task"});
      }
      throw;
    }
  }
}

// -------------------------------------------------------- external copies

Taken ControlPlane::take(TaskId id, double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  require_open("take_external");
  Task* t = find(id);
  if (t == nullptr) throw TaskError("launch: unknown task id " + id_text(id));
  if (!t->launchable()) {
    throw TaskError("launch: task " + id_text(id) + " is " + stage_name(t->state) +
                    " and was launched before; a task is launched once, after get_match or put_match");
  }
  t->launched = Task::Clock::now();
  if (t->state == TaskStage::kDone) return {};  // nothing to copy
  t->move_to(TaskStage::kClaimed);
  ++launching_;
  cv_.wait_until(lock, deadline_after(timeout_s), [t] { return !t->promotion; });
  --launching_;
  Taken out;
  if (t->promotion) {
    t->ending = Outcome{TaskStage::kFailed, "the SSD tier did not deliver in time"};
    t->move_to(TaskStage::kEndingAfterPromotion);
  } else {
    t->move_to(TaskStage::kExternal);
    out.blocks = t->blocks;
    out.host_ids = t->host_ids;
  }
  lock.unlock();
  cv_.notify_all();
  return out;
}

std::optional<Taken> ControlPlane::try_take(TaskId id) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("take_external");
    Task* t = find(id);
    if (t != nullptr && t->launchable() && t->promotion) return std::nullopt;
  }
  return take(id, 0.0);  // no promotion pending now, and none can start: take() does not wait
}

void ControlPlane::complete(TaskId id, bool ok, const std::string& error) {
  std::unique_lock<std::mutex> lock(mu_);
  Task* t = find(id);
  if (t == nullptr) throw TaskError("finish_external: unknown task id " + id_text(id));
  if (t->state == TaskStage::kEndingAfterPromotion || t->state == TaskStage::kFinishing) {
    t->detached = true;  // its end is under way (its SSD reads still write into its blocks): it ends it
    return;
  }
  if (t->ended()) {
    tasks_.erase(id);
    return;
  }
  if (t->state != TaskStage::kExternal) {
    throw TaskError("finish_external: task " + id_text(id) + " was not taken by take_external");
  }
  t->detached = true;  // nobody waits for it afterwards
  t->move_to(TaskStage::kFinishing);
  lock.unlock();
  end(t, Outcome{ok ? TaskStage::kDone : TaskStage::kFailed, error});
}

void ControlPlane::cancel(const std::vector<TaskId>& ids) {
  for (TaskId id : ids) {
    std::unique_lock<std::mutex> lock(mu_);
    Task* t = find(id);
    if (t == nullptr) continue;
    if (t->state == TaskStage::kPromoting) {
      t->ending = Outcome{TaskStage::kCancelled, ""};
      t->move_to(TaskStage::kEndingAfterPromotion);  // ended once its SSD reads are done
      continue;
    }
    if (t->state != TaskStage::kMatched) {
      const bool busy = running(t->state);
      lock.unlock();
      if (busy) log_line(LogLevel::kWarning, "cancel: task " + id_text(id) + " is already copying; it will complete");
      continue;
    }
    t->move_to(TaskStage::kFinishing);
    lock.unlock();
    end(t, Outcome{TaskStage::kCancelled, ""});
  }
}

}  // namespace flexkv
