// Small helpers the ControlPlane's files share.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>

#include "control/task.h"

namespace flexkv {

// A task that has been launched or taken and has not ended: waits report it as running.
inline bool running(TaskStage s) {
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

inline std::chrono::steady_clock::time_point deadline_after(double seconds) {
  const double s = std::max(0.0, std::min(seconds, 1e9));  // also infinity: a deadline decades away
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(s));
}

// Task ids as callers wrote them: an id from Python may have been negative.
inline std::string id_text(TaskId id) { return std::to_string(static_cast<int64_t>(id)); }

}  // namespace flexkv
