// Block events: when a block becomes readable in a tier and when it leaves it.
// Routers (Dynamo's KV router) credit a worker for the blocks its tiers hold;
// an adapter drains these with take() and publishes them in the engine's KV
// event format.
//
// Recording is off until enable() is called (nobody pays for events nobody
// reads). The log is bounded: past its capacity the oldest events are dropped
// and counted, and a consumer that sees dropped() grow should resynchronise
// (for example by treating the next kCleared as authoritative).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <vector>

#include "control/key_run.h"
#include "index/radix_index.h"

namespace flexkv {

enum class Tier : uint8_t { kCpu = 0, kSsd = 1, kRemote = 2 };
const char* tier_name(Tier tier);

struct BlockEvent {
  enum class Kind : uint8_t { kStored, kRemoved, kCleared };
  Kind kind = Kind::kStored;
  Tier tier = Tier::kCpu;
  BlockKey key;                 // kStored, kRemoved
  BlockKey parent;              // kStored: the previous block's key, or the namespace seed at position 0
  int64_t position = 0;         // kStored: the block's position in its sequence
  std::vector<int64_t> tokens;  // kStored: the block's token ids (empty for page-keyed blocks)
};

class BlockEventLog {
 public:
  void enable(size_t capacity);
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  // Records blocks positions[k] of `run` as readable in `tier`.
  void stored(Tier tier, const KeyRun& run, const int64_t* positions, size_t n);
  void removed(Tier tier, const BlockKey* keys, size_t n);
  void cleared(Tier tier);
  std::vector<BlockEvent> take();
  uint64_t dropped() const;

  // An index listener that records a tier's removals here.
  IndexListener* listener(Tier tier) { return &listeners_[static_cast<size_t>(tier)]; }

 private:
  struct TierListener : IndexListener {
    BlockEventLog* log = nullptr;
    Tier tier = Tier::kCpu;
    void on_removed(const BlockKey* keys, size_t n) override { log->removed(tier, keys, n); }
    void on_cleared() override { log->cleared(tier); }
  };
  void push(BlockEvent e);  // with mu_ held

 public:
  BlockEventLog() {
    for (size_t t = 0; t < 3; ++t) {
      listeners_[t].log = this;
      listeners_[t].tier = static_cast<Tier>(t);
    }
  }

 private:
  std::atomic<bool> enabled_{false};
  mutable std::mutex mu_;
  std::deque<BlockEvent> events_;
  size_t capacity_ = 0;
  uint64_t dropped_ = 0;
  TierListener listeners_[3];
};

}  // namespace flexkv
