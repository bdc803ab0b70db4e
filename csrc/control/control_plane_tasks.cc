// ControlPlane: a task's life after its match: launch or take, promotion,
// copies, its end (commit or release, write-through), cancel and the waits.
#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "control/control_plane.h"
#include "control/log.h"
#include "control/tier_flows.h"
#include "flexkv/errors.h"

namespace flexkv {
namespace {

constexpr int kWriteThroughAttempts = 8;

bool running(TaskStage s) {
  switch (s) {
    case TaskStage::kClaimed:
    case TaskStage::kWaitingForPromotion:
    case TaskStage::kEndingAfterPromotion:
    case TaskStage::kCopying:
    case TaskStage::kExternal:
    case TaskStage::kFinishing:
      return true;
    default:
      return false;
  }
}

std::chrono::steady_clock::time_point deadline_after(double seconds) {
  const double s = std::max(0.0, std::min(seconds, 1e9));
  return std::chrono::steady_clock::now() + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                std::chrono::duration<double>(s));
}

// Task ids as callers wrote them: an id from Python may have been negative.
std::string id_text(TaskId id) { return std::to_string(static_cast<int64_t>(id)); }

std::string ids_text(const Task& t) { return "task " + id_text(t.id); }

}  // namespace

// ------------------------------------------------------------------- ending

std::optional<ControlPlane::WriteThrough> ControlPlane::commit_put(Task* t) {
  // A completed put's blocks become readable and, with an SSD tier, are written
  // through. While few blocks wait for the SSD they stay locked until written, so
  // eviction cannot take them first; past that they are queued unlocked.
  const KeyRun& run = *t->run;
  const size_t n = t->blocks.empty() ? 0 : static_cast<size_t>(t->blocks.back()) + 1;
  if (!ssd_ || n == 0) {
    cpu_->index().commit(t->held.data(), t->held.size());
    events_.stored(Tier::kCpu, run, t->blocks.data(), t->blocks.size());
    return std::nullopt;
  }
  bool hold;
  {
    std::lock_guard<std::mutex> g(mu_);
    hold = write_backlog_ + t->held.size() <= write_backlog_limit_;
    if (hold) write_backlog_ += t->held.size();
  }
  WriteThrough w{t->id, t->run, n, hold ? t->held : std::vector<int32_t>{}};
  try {
    if (hold) {
      cpu_->index().set_ready(t->held.data(), t->held.size(), true);  // readable now; unlocked once on SSD
    } else {
      cpu_->index().commit(t->held.data(), t->held.size());
    }
  } catch (...) {
    std::lock_guard<std::mutex> g(mu_);
    write_backlog_ -= w.own.size();
    throw;
  }
  events_.stored(Tier::kCpu, run, t->blocks.data(), t->blocks.size());
  return w;
}

void ControlPlane::queue_write_through(WriteThrough w) {
  // The task is kWritingThrough by now, so the job's end always finds it there (or forgotten).
  auto job = std::make_shared<WriteThrough>(std::move(w));
  if (ssd_writes_->post([this, job] { write_through_job(job->task, job->run, job->n, job->own); })) return;
  // Shut down (an external copy reported late): the SSD tier is closed, the blocks stay CPU-only.
  cpu_->index().release(job->own.data(), job->own.size());
  stats_.add(Counter::kSsdWriteSkippedBlocks, static_cast<int64_t>(job->own.size()));
  {
    std::lock_guard<std::mutex> g(mu_);
    write_backlog_ -= job->own.size();
    Task* t = find_any(job->task);
    if (t != nullptr && t->state == TaskStage::kWritingThrough) {
      t->move_to(TaskStage::kDone);
      if (t->detached) tasks_.erase(job->task);
    }
  }
  cv_.notify_all();
}

void ControlPlane::end(Task* t, Outcome outcome) {
  // The caller moved t to kFinishing: no other path touches its blocks now.
  std::vector<std::pair<LogLevel, std::string>> notes;
  std::optional<WriteThrough> write;
  if (!t->held.empty()) {
    try {
      if (t->kind == TaskKind::kPut && outcome.state == TaskStage::kDone) {
        write = commit_put(t);
        if (write) outcome.state = TaskStage::kWritingThrough;
        stats_.add(Counter::kPutStoredBlocks, static_cast<int64_t>(t->blocks.size()));
      } else {
        cpu_->index().release(t->held.data(), t->held.size());
      }
    } catch (const std::exception& e) {  // an index bug: never leave the blocks locked or the engine waiting
      notes.emplace_back(LogLevel::kError, ids_text(*t) + ": ending it in the index failed: " + e.what());
      outcome.state = TaskStage::kFailed;
      outcome.error = (outcome.error.empty() ? "" : outcome.error + " ") + "index update failed: " + e.what();
      try {
        cpu_->index().release(t->held.data(), t->held.size());
      } catch (const std::exception& e2) {
        notes.emplace_back(LogLevel::kError, ids_text(*t) + ": unlocking its blocks failed too: " + e2.what());
      }
    }
  }
  const bool ok = outcome.state == TaskStage::kDone || outcome.state == TaskStage::kWritingThrough;
  if (!outcome.error.empty()) {
    notes.emplace_back(LogLevel::kWarning, ids_text(*t) + " (" + kind_name(t->kind) + ") " +
                                               (ok ? "completed" : stage_name(outcome.state)) + ": " + outcome.error);
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    // A task that did not complete reports only blocks that reached the engine: a get's copy that ran.
    if (!ok && !(t->kind == TaskKind::kGet && t->job != 0)) t->blocks.clear();
    if (ok && t->kind == TaskKind::kGet) stats_.add(Counter::kGetLoadedBlocks, static_cast<int64_t>(t->blocks.size()));
    if (outcome.state == TaskStage::kFailed) stats_.add(Counter::kTasksFailed, 1);
    if (outcome.state == TaskStage::kCancelled) stats_.add(Counter::kTasksCancelled, 1);
    t->error = outcome.error;
    t->move_to(outcome.state);
    if (t->detached && t->settled()) tasks_.erase(t->id);
  }
  cv_.notify_all();
  if (write) queue_write_through(std::move(*write));
  for (const auto& [level, line] : notes) log_line(level, line);
}

// ---------------------------------------------------------------- promotion

void ControlPlane::begin_promotion(Task* t, std::unique_lock<std::mutex>& lock) {
  const TaskId id = t->id;
  const Promotion p = *t->promotion;
  std::shared_ptr<const KeyRun> run = t->run;
  if (closing_) {  // shutting down: give the blocks back instead of reading them
    t->promotion.reset();
    t->held.resize(t->held.size() - p.cpu_ids.size());
    t->state = TaskStage::kFinishing;  // a new task: nobody has seen it yet
    lock.unlock();
    abandon_promotion(*cpu_, *ssd_, p);
    end(t, Outcome{TaskStage::kCancelled, "the cache is shutting down"});
    return;
  }
  ++promoting_;  // the SSD read thread runs until shutdown has seen promoting_ drop to 0
  ssd_reads_->post([this, id, p, run] {
    FlowCounters counters;
    const size_t arrived = run_promotion(*cpu_, *ssd_, *run, p, counters, events_);
    on_promoted(id, arrived, counters);
  });
  lock.unlock();
}

void ControlPlane::on_promoted(TaskId id, size_t arrived, FlowCounters counters) {
  counters.add_to(stats_);
  std::unique_lock<std::mutex> lock(mu_);
  --promoting_;
  Task* t = find_any(id);
  if (t == nullptr || !t->promotion) {
    cv_.notify_all();
    return;
  }
  const Promotion& p = *t->promotion;
  // Blocks from `arrived` on did not arrive: their CPU locks are gone; the task shrinks to what did.
  t->held.resize(t->held.size() - (p.stop - arrived));
  const size_t first = t->blocks.empty() ? p.start : static_cast<size_t>(t->blocks.front());
  const size_t keep = std::min(t->blocks.size(), arrived > first ? arrived - first : 0);
  t->blocks.resize(keep);
  t->host_ids.resize(keep);
  if (arrived < p.stop) {
    t->error = std::to_string(p.stop - arrived) + " block(s) promised from the SSD tier did not arrive";
  }
  t->promotion.reset();
  switch (t->state) {
    case TaskStage::kPromoting:
      t->move_to(TaskStage::kMatched);
      break;
    case TaskStage::kWaitingForPromotion:
      if (t->kind == TaskKind::kPrefetch) {
        Outcome o{t->error.empty() ? TaskStage::kDone : TaskStage::kFailed, t->error};
        t->move_to(TaskStage::kFinishing);
        lock.unlock();
        end(t, o);
        return;
      }
      try {
        submit_copy(t, lock);  // ends the task itself when the copy cannot start
      } catch (const TaskError&) {
      }
      return;
    case TaskStage::kEndingAfterPromotion: {
      Outcome o = t->ending;
      t->move_to(TaskStage::kFinishing);
      lock.unlock();
      end(t, o);
      return;
    }
    default:  // kClaimed: the launch or take holding it carries on without a promotion
      break;
  }
  lock.unlock();
  cv_.notify_all();
}

// -------------------------------------------------------------------- copies

void ControlPlane::submit_copy(Task* t, std::unique_lock<std::mutex>& lock) {
  // With mu_ held by `lock`, t launched (kClaimed or kWaitingForPromotion) with its plan.
  // Returns with `lock` released. Throws TaskError if the copy engine refused the job.
  std::vector<int64_t> plan = t->plan;
  plan.resize(std::min(plan.size(), t->blocks.size()));  // a promotion may have delivered fewer blocks
  if (plan.empty()) {
    Outcome o{TaskStage::kFailed, t->error.empty() ? "no promised block arrived from the SSD tier" : t->error};
    t->move_to(TaskStage::kFinishing);
    lock.unlock();
    end(t, o);
    return;
  }
  Layout layout;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    auto it = layouts_.find(t->layout);
    if (it != layouts_.end()) layout = it->second;
  }
  t->move_to(TaskStage::kCopying);
  const std::vector<int64_t> host(t->host_ids.begin(), t->host_ids.begin() + static_cast<std::ptrdiff_t>(plan.size()));
  const bool load = t->kind == TaskKind::kGet;
  const bool layerwise = t->layerwise;
  const TaskId id = t->id;
  lock.unlock();
  uint64_t job = 0;
  std::string refused;
  try {
    if (layout.engine == nullptr) throw TaskError("its engine memory is no longer registered");
    job = layout.engine->submit(load ? CopyDirection::kHostToEngine : CopyDirection::kEngineToHost, layout.id,
                                plan.data(), host.data(), plan.size(), /*urgent=*/load, layerwise, id);
  } catch (const std::exception& e) {
    refused = e.what();
  }
  lock.lock();
  // The copy may have ended, and the task been reported and forgotten, while the lock was released.
  t = find_any(id);
  if (refused.empty()) {
    if (t != nullptr && t->state == TaskStage::kCopying) t->job = job;
    lock.unlock();
    cv_.notify_all();  // wait_layer waits for the job id
    return;
  }
  t->move_to(TaskStage::kFinishing);  // a refused job never completes: the task is still here, kCopying
  lock.unlock();
  end(t, Outcome{TaskStage::kFailed, "launch failed: " + refused});
  throw TaskError("task " + id_text(id) + ": " + refused);
}

void ControlPlane::collect(CopyEngine* engine) {
  for (;;) {
    std::optional<CopyCompletion> c = engine->next_completion(-1);
    if (!c) return;  // interrupted: shutting down
    on_copy_done(*c);
  }
}

void ControlPlane::on_copy_done(const CopyCompletion& c) {
  std::unique_lock<std::mutex> lock(mu_);
  if (completions_paused_) {
    held_completions_.push_back(c);
    return;
  }
  Task* t = find_any(c.tag);
  if (t == nullptr || t->state != TaskStage::kCopying) return;
  if (!c.error.empty()) {  // part of the copy may be missing: a get reports no tokens, so nothing is trusted
    t->blocks.clear();
    if (t->error.empty()) t->error = c.error;
  }
  if (t->job == 0) t->job = c.job;
  Outcome o{t->error.empty() ? TaskStage::kDone : TaskStage::kFailed, t->error};
  t->move_to(TaskStage::kFinishing);
  lock.unlock();
  end(t, o);
}

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
    for (size_t b = 0; b < t.promised; ++b) {
      const int64_t first = targets.data[b * tpb];
      bool ok = first >= 0 && first % static_cast<int64_t>(tpb) == 0;
      for (size_t k = 1; ok && k < tpb; ++k) ok = targets.data[b * tpb + k] == first + static_cast<int64_t>(k);
      if (!ok) {
        throw TaskError(who + "slot_mapping must give each block's tokens consecutive slots starting at a multiple "
                        "of tokens_per_block=" + std::to_string(tpb));
      }
      blocks[b] = first / static_cast<int64_t>(tpb);
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
  if (t.kind == TaskKind::kGet) {
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

// --------------------------------------------------------------- write-through

void ControlPlane::write_through_job(TaskId id, std::shared_ptr<const KeyRun> run, size_t n, std::vector<int32_t> own) {
  FlowCounters counters;
  try {
    // Held blocks cannot be evicted, so a gap before them is another put still storing: wait for it a
    // little. Unheld ones may be evicted already: write what is there at once.
    const int attempts = own.empty() ? 1 : kWriteThroughAttempts;
    bool written = false;
    for (int attempt = 0; attempt < attempts && !written; ++attempt) {
      written = write_through(*cpu_, *ssd_, *run, n, /*whole=*/!own.empty(), counters, events_);
      if (!written) std::this_thread::sleep_for(std::chrono::milliseconds(2 * (attempt + 1)));
    }
    if (!written) counters.ssd_write_skipped_blocks += static_cast<int64_t>(own.size());
  } catch (const std::exception& e) {  // a failed write-through only costs an SSD copy
    log_line(LogLevel::kError, "SSD tier: write-through of task " + id_text(id) + " failed: " + e.what());
  }
  if (!own.empty()) {
    try {
      cpu_->index().release(own.data(), own.size());
    } catch (const std::exception& e) {
      log_line(LogLevel::kError, std::string("SSD tier: unlocking written blocks failed: ") + e.what());
    }
  }
  counters.add_to(stats_);
  {
    std::lock_guard<std::mutex> g(mu_);
    write_backlog_ -= own.size();
    Task* t = find_any(id);
    if (t != nullptr && t->state == TaskStage::kWritingThrough) {
      t->move_to(TaskStage::kDone);
      if (t->detached) tasks_.erase(id);
    }
  }
  cv_.notify_all();
}

// ------------------------------------------------------------------- waiting

Report ControlPlane::report(TaskId id) {
  Report r;
  r.task = id;
  Task* t = find(id);
  if (t == nullptr) return r;  // kNotFound
  if (t->state == TaskStage::kMatched || t->state == TaskStage::kPromoting) {
    r.status = ReportStatus::kUnready;
    return r;
  }
  if (!t->ended()) {
    r.status = ReportStatus::kTimeout;
    return r;
  }
  r.status = t->state == TaskStage::kFailed      ? ReportStatus::kFailed
             : t->state == TaskStage::kCancelled ? ReportStatus::kCancelled
                                                 : ReportStatus::kSuccess;
  r.seq_len = t->seq_len;
  r.blocks = std::move(t->blocks);
  r.error = t->error;
  if (t->state == TaskStage::kWritingThrough) {
    t->detached = true;  // reported: forgotten once its write-through ends
  } else {
    tasks_.erase(id);
  }
  return r;
}

std::vector<Report> ControlPlane::wait(const std::vector<TaskId>& ids, double timeout_s, bool completely) {
  std::unique_lock<std::mutex> lock(mu_);
  auto busy = [&](TaskId id) {
    Task* t = find(id);
    return t != nullptr && (running(t->state) || (completely && t->state == TaskStage::kWritingThrough &&
                                                  !t->detached));
  };
  cv_.wait_until(lock, deadline_after(timeout_s), [&] {
    for (TaskId id : ids)
      if (busy(id)) return false;
    return true;
  });
  std::vector<Report> out;
  for (TaskId id : ids) out.push_back(report(id));
  return out;
}

std::vector<Report> ControlPlane::try_wait(const std::vector<TaskId>& ids) {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<Report> out;
  for (TaskId id : ids) {
    Task* t = find(id);
    if (t != nullptr && running(t->state)) continue;
    out.push_back(report(id));
  }
  return out;
}

bool ControlPlane::flush(double timeout_s) {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_until(lock, deadline_after(timeout_s), [this] {
    for (const auto& [id, t] : tasks_)
      if (t.state == TaskStage::kWritingThrough) return false;
    return true;
  });
}

Report ControlPlane::try_wait_one(TaskId id) {
  std::lock_guard<std::mutex> g(mu_);
  return report(id);
}

size_t ControlPlane::tasks_in_flight() const {
  std::lock_guard<std::mutex> g(mu_);
  size_t n = 0;
  for (const auto& [id, t] : tasks_) n += running(t.state) ? 1 : 0;
  return n;
}

bool ControlPlane::wait_layer(TaskId id, int32_t layer, void* stream, double timeout_s) {
  if (layer < 0 || layer >= options_.num_layers) {
    throw TaskError("wait_layer: layer must be an int in [0, " + std::to_string(options_.num_layers) + "), got " +
                    std::to_string(layer));
  }
  std::unique_lock<std::mutex> lock(mu_);
  const auto deadline = deadline_after(timeout_s);
  CopyEngine* engine = nullptr;
  uint64_t job = 0;
  for (;;) {
    Task* t = find(id);
    if (t == nullptr) throw TaskError("wait_layer: unknown task id " + id_text(id) + " (or already reported by wait)");
    if (t->state == TaskStage::kMatched || t->state == TaskStage::kPromoting) {
      throw TaskError("wait_layer: task " + id_text(id) + " is not launched; launch it first");
    }
    if (t->ended()) return t->state == TaskStage::kDone || t->state == TaskStage::kWritingThrough;
    if (t->state == TaskStage::kCopying && t->job != 0) {
      std::lock_guard<std::mutex> g(engines_mu_);
      auto it = layouts_.find(t->layout);
      if (it != layouts_.end() && it->second.cuda) {
        engine = it->second.engine;
        job = t->job;
        break;  // the copy is queued: its layer events exist
      }
    }
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return false;
  }
  lock.unlock();
  if (stream != nullptr) {
    engine->stream_wait_group(job, layer, stream);
  } else {
    engine->wait_group(job, layer);
  }
  return true;
}

}  // namespace flexkv
