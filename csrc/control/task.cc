#include "control/task.h"

#include <stdexcept>
#include <string>

namespace flexkv {
namespace {

using S = TaskStage;

bool allowed(S from, S to) {
  switch (from) {
    case S::kMatched: return to == S::kClaimed || to == S::kFinishing;
    case S::kPromoting: return to == S::kMatched || to == S::kClaimed || to == S::kEndingAfterPromotion;
    case S::kClaimed:
      return to == S::kCopying || to == S::kWaitingForPromotion || to == S::kExternal || to == S::kFinishing ||
             to == S::kEndingAfterPromotion;
    case S::kWaitingForPromotion: return to == S::kCopying || to == S::kFinishing;
    case S::kEndingAfterPromotion: return to == S::kFinishing;
    case S::kCopying: return to == S::kFinishing;
    case S::kExternal: return to == S::kFinishing;
    case S::kFinishing: return to == S::kDone || to == S::kFailed || to == S::kCancelled || to == S::kWritingThrough;
    case S::kWritingThrough: return to == S::kDone;
    case S::kDone:
    case S::kFailed:
    case S::kCancelled: return false;
  }
  return false;
}

}  // namespace

const char* stage_name(TaskStage s) {
  switch (s) {
    case S::kMatched: return "matched";
    case S::kPromoting: return "promoting";
    case S::kClaimed: return "claimed";
    case S::kWaitingForPromotion: return "waiting for its promotion";
    case S::kEndingAfterPromotion: return "ending after its promotion";
    case S::kCopying: return "copying";
    case S::kExternal: return "copied by another process";
    case S::kFinishing: return "finishing";
    case S::kWritingThrough: return "writing through";
    case S::kDone: return "completed";
    case S::kFailed: return "failed";
    case S::kCancelled: return "cancelled";
  }
  return "?";
}

const char* kind_name(TaskKind k) {
  switch (k) {
    case TaskKind::kGet: return "get";
    case TaskKind::kPut: return "put";
    case TaskKind::kPrefetch: return "prefetch";
  }
  return "?";
}

void Task::move_to(TaskStage to) {
  if (!allowed(state, to)) {
    throw std::logic_error("task " + std::to_string(id) + ": no transition from " + stage_name(state) + " to " +
                           stage_name(to));
  }
  state = to;
  if (ended()) finished = Clock::now();
}

bool Task::ended() const {
  return state == S::kWritingThrough || state == S::kDone || state == S::kFailed || state == S::kCancelled;
}

bool Task::settled() const { return state == S::kDone || state == S::kFailed || state == S::kCancelled; }

bool Task::launchable() const {
  if (launched) return false;
  return state == S::kMatched || state == S::kPromoting || (state == S::kDone && promised == 0);
}

}  // namespace flexkv
