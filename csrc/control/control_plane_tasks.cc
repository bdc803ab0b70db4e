// ControlPlane: a task's life after its match: launch or take, promotion,
// copies, its end (commit or release, write-through), cancel and the waits.
#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "control/control_plane.h"
#include "control/log.h"
#include "control/plane_util.h"
#include "control/tier_flows.h"
#include "flexkv/errors.h"

namespace flexkv {
namespace {

constexpr int kWriteThroughAttempts = 8;

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
    const int64_t moved = static_cast<int64_t>(t->blocks.size());
    const int64_t bytes = moved * static_cast<int64_t>(options_.block_bytes);
    if (ok && t->kind == TaskKind::kGet) {
      stats_.add(Counter::kGetLoadedBlocks, moved);
      stats_.add(Counter::kLoadBytes, bytes);
    }
    if (ok && t->kind == TaskKind::kPut) stats_.add(Counter::kStoreBytes, bytes);
    if (ok && t->launched && t->kind != TaskKind::kPrefetch) {
      const double s = std::chrono::duration<double>(Task::Clock::now() - *t->launched).count();
      stats_.observe(t->kind == TaskKind::kGet ? Timer::kLoad : Timer::kStore, s);
    }
    if (outcome.state == TaskStage::kFailed) stats_.add(Counter::kTasksFailed, 1);
    if (outcome.state == TaskStage::kCancelled) stats_.add(Counter::kTasksCancelled, 1);
    t->error = outcome.error;
    t->move_to(outcome.state);
    // Its keys and tokens (a MiB for a long prompt) are of no use now: a report needs only blocks and error.
    t->run.reset();
    t->plan.clear();
    t->plan.shrink_to_fit();
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
    const Task::Clock::time_point started = Task::Clock::now();
    const size_t arrived = run_promotion(*cpu_, *ssd_, *run, p, counters, events_);
    stats_.observe(Timer::kPromotion, std::chrono::duration<double>(Task::Clock::now() - started).count());
    on_promoted(id, arrived, counters);
  });
  lock.unlock();
}

void ControlPlane::on_promoted(TaskId id, size_t arrived, FlowCounters counters) {
  counters.add_to(stats_, static_cast<int64_t>(options_.block_bytes));
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

// --------------------------------------------------------------- write-through

void ControlPlane::write_through_job(TaskId id, std::shared_ptr<const KeyRun> run, size_t n, std::vector<int32_t> own) {
  FlowCounters counters;
  const Task::Clock::time_point started = Task::Clock::now();
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
  counters.add_to(stats_, static_cast<int64_t>(options_.block_bytes));
  stats_.observe(Timer::kWriteThrough, std::chrono::duration<double>(Task::Clock::now() - started).count());
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

}  // namespace flexkv
