// ControlPlane: the waits: wait, try_wait, wait_layer, flush, and the report
// a task gets when it is collected.
#include <algorithm>
#include <chrono>
#include <string>

#include "control/control_plane.h"
#include "control/plane_util.h"
#include "flexkv/errors.h"

namespace flexkv {

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
