#include "control/block_events.h"

namespace flexkv {

const char* tier_name(Tier tier) {
  switch (tier) {
    case Tier::kCpu: return "cpu";
    case Tier::kSsd: return "ssd";
    case Tier::kRemote: return "remote";
  }
  return "?";
}

void BlockEventLog::enable(size_t capacity) {
  std::lock_guard<std::mutex> g(mu_);
  capacity_ = capacity == 0 ? 1 : capacity;
  enabled_.store(true);
}

void BlockEventLog::push(BlockEvent e) {
  if (events_.size() >= capacity_) {
    events_.pop_front();
    ++dropped_;
  }
  events_.push_back(std::move(e));
}

void BlockEventLog::stored(Tier tier, const KeyRun& run, const int64_t* positions, size_t n) {
  if (!enabled() || n == 0) return;
  const auto tpb = static_cast<size_t>(run.tokens_per_block);
  std::lock_guard<std::mutex> g(mu_);
  for (size_t k = 0; k < n; ++k) {
    const auto p = static_cast<size_t>(positions[k]);
    BlockEvent e;
    e.kind = BlockEvent::Kind::kStored;
    e.tier = tier;
    e.key = run.keys[p];
    e.parent = run.parent_of(p);
    e.position = run.position_of(p);
    if (const int64_t* t = run.tokens_of(p)) e.tokens.assign(t, t + tpb);
    push(std::move(e));
  }
}

void BlockEventLog::removed(Tier tier, const BlockKey* keys, size_t n) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> g(mu_);
  for (size_t k = 0; k < n; ++k) {
    BlockEvent e;
    e.kind = BlockEvent::Kind::kRemoved;
    e.tier = tier;
    e.key = keys[k];
    push(std::move(e));
  }
}

void BlockEventLog::cleared(Tier tier) {
  if (!enabled()) return;
  std::lock_guard<std::mutex> g(mu_);
  BlockEvent e;
  e.kind = BlockEvent::Kind::kCleared;
  e.tier = tier;
  push(std::move(e));
}

std::vector<BlockEvent> BlockEventLog::take() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<BlockEvent> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
  events_.clear();
  return out;
}

uint64_t BlockEventLog::dropped() const {
  std::lock_guard<std::mutex> g(mu_);
  return dropped_;
}

}  // namespace flexkv
