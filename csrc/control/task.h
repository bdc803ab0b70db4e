// Task: one get, put or prefetch, from its match to its end, as one state
// machine. Every transition goes through Task::move_to, which refuses the ones
// the table below does not allow, so no path can end a task twice or skip the
// release of its blocks.
//
//   kMatched ──launch/take──▶ kClaimed ──submit──▶ kCopying ──copy done──▶ kFinishing
//      │  ▲                      │  │                                        │
//      │  └─promotion done─┐     │  └──take──▶ kExternal ──complete()───▶ kFinishing
//      │                   │     └─promotion running──▶ kWaitingForPromotion
//   kPromoting ──────────────┘   (a prefetch starts there)    │ promotion done: submit / end
//      │ cancel                                               ▼
//      └──────────▶ kEndingAfterPromotion ──promotion done──▶ kFinishing
//
//   kFinishing (its blocks are committed or unlocked) ──▶ kDone | kFailed | kCancelled
//                                                   └──▶ kWritingThrough ──▶ kDone
//
// kMatched with nothing held starts as kDone. A task in kWritingThrough has
// ended for the engine (its blocks are readable); only a complete wait waits
// for it to reach kDone.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "control/key_run.h"

namespace flexkv {

using TaskId = uint64_t;

enum class TaskKind { kGet, kPut, kPrefetch };

enum class TaskStage {
  kMatched,               // blocks locked; waits for launch, take or cancel
  kPromoting,             // as kMatched, while its SSD blocks come up into the CPU tier
  kClaimed,               // a launch or take holds it while it checks the engine blocks
  kWaitingForPromotion,   // launched (or a prefetch): copies or ends once the promotion ends
  kEndingAfterPromotion,  // its end is decided (cancel, failed launch, a take that timed out)
  kCopying,               // the control plane's copy engine moves its bytes
  kExternal,              // another process moves its bytes and reports with complete()
  kFinishing,             // its blocks are being committed or unlocked
  kWritingThrough,        // ended well for the engine; being written to the SSD tier
  kDone,
  kFailed,
  kCancelled,
};

const char* stage_name(TaskStage s);
const char* kind_name(TaskKind k);

// How a task ends, decided before its blocks are let go.
struct Outcome {
  TaskStage state = TaskStage::kDone;  // kDone, kFailed or kCancelled
  std::string error;
};

// Blocks [start, stop) of a run on their way from SSD slots into CPU blocks (both locked).
struct Promotion {
  size_t start = 0;
  size_t stop = 0;
  std::vector<int32_t> slots;    // locked in the SSD index
  std::vector<int32_t> cpu_ids;  // reserved (locked, unready) in the CPU index
};

struct Task {
  using Clock = std::chrono::steady_clock;

  TaskId id = 0;
  TaskKind kind = TaskKind::kGet;
  TaskStage state = TaskStage::kMatched;
  std::shared_ptr<const KeyRun> run;
  size_t seq_len = 0;              // tokens the match was asked about
  std::vector<int64_t> blocks;     // run positions of the blocks it moves, ascending
  std::vector<int32_t> host_ids;   // the CPU block of each of those
  std::vector<int32_t> held;       // CPU blocks it holds locked (a get also holds blocks it promotes for the cache)
  size_t promised = 0;             // blocks its mask offered: launch() must name an engine block for each
  std::optional<Promotion> promotion;
  std::vector<int64_t> plan;       // engine blocks, launched while promoting
  int32_t layout = -1;             // the facade layout it copies with
  bool layerwise = false;
  uint64_t job = 0;                // its copy job, while kCopying
  Outcome ending;                  // kEndingAfterPromotion: how it ends
  bool detached = false;           // nobody will collect it: forgotten once it ends
  std::string error;
  Clock::time_point created = Clock::now();
  std::optional<Clock::time_point> launched;  // set once: a task is launched (or taken) at most once
  Clock::time_point finished;

  // Moves to `to`; throws std::logic_error naming both states if the machine has no such edge.
  void move_to(TaskStage to);
  // Ended for the engine: waits without `completely` return.
  bool ended() const;
  // Ended for good: nothing of it runs any more.
  bool settled() const;
  // Matched and not launched yet; a task with nothing to move counts, once.
  bool launchable() const;
};

}  // namespace flexkv
