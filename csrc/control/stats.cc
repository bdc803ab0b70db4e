#include "control/stats.h"

namespace flexkv {

namespace {
const char* const kNames[] = {
    "get_requests",        "get_query_blocks",      "get_hit_blocks",          "get_loaded_blocks",
    "put_requests",        "put_new_blocks",        "put_cached_blocks",       "put_dropped_blocks",
    "put_no_prefix_blocks", "put_stored_blocks",    "lookup_requests",         "lookup_hit_blocks",
    "ssd_hit_blocks",      "ssd_mismatch_blocks",   "ssd_read_errors",         "ssd_written_blocks",
    "ssd_write_errors",    "ssd_write_skipped_blocks", "tasks_failed",         "tasks_cancelled",
    "get_cpu_hit_blocks",  "get_ssd_hit_blocks",    "load_bytes",              "store_bytes",
    "ssd_read_bytes",      "ssd_write_bytes",
    "remote_hit_blocks",   "remote_mismatch_blocks", "remote_read_errors",     "remote_written_blocks",
    "remote_write_errors", "remote_write_skipped_blocks", "remote_index_errors", "remote_refused_requests",
    "remote_miss_blocks",  "remote_read_blocks",    "remote_read_bytes",       "remote_write_bytes",
    "remote_evicted_blocks",
};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Counter::kCount), "a name per counter");
}  // namespace

std::vector<std::pair<std::string, int64_t>> Counters::snapshot() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (size_t i = 0; i < static_cast<size_t>(Counter::kCount); ++i) out.emplace_back(kNames[i], values_[i].load());
  return out;
}

const double* Histogram::bounds() {
  // 50 us .. 10 s, about 2.5x apart: a CPU-tier load of a few blocks to a stalled SSD read.
  static const double kBounds[kBuckets] = {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                           0.05,    0.1,    0.25,    0.5,    1.0,   2.5,    5.0,   10.0,  30.0};
  return kBounds;
}

void Histogram::observe(double seconds) {
  const double* b = bounds();
  size_t i = 0;
  while (i < kBuckets && seconds > b[i]) ++i;
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<int64_t>(seconds * 1e9), std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.bounds.assign(bounds(), bounds() + kBuckets);
  for (const auto& c : counts_) {
    s.counts.push_back(c.load(std::memory_order_relaxed));
    s.count += s.counts.back();
  }
  s.sum = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) * 1e-9;
  return s;
}

namespace {
const char* const kTimerNames[] = {"get_match", "put_match",        "load",
                                   "store",     "promotion",        "write_through",
                                   "remote_promotion", "remote_write_through"};
static_assert(sizeof(kTimerNames) / sizeof(kTimerNames[0]) == static_cast<size_t>(Timer::kCount), "a name per timer");
}  // namespace

std::vector<std::pair<std::string, Histogram::Snapshot>> Counters::histograms() const {
  std::vector<std::pair<std::string, Histogram::Snapshot>> out;
  for (size_t i = 0; i < static_cast<size_t>(Timer::kCount); ++i) {
    out.emplace_back(kTimerNames[i], timers_[i].snapshot());
  }
  return out;
}

bool Counters::observe_named(const std::string& name, double seconds) {
  for (size_t i = 0; i < static_cast<size_t>(Timer::kCount); ++i) {
    if (name == kTimerNames[i]) {
      timers_[i].observe(seconds);
      return true;
    }
  }
  return false;
}

bool Counters::add_named(const std::string& name, int64_t v) {
  for (size_t i = 0; i < static_cast<size_t>(Counter::kCount); ++i) {
    if (name == kNames[i]) {
      values_[i].fetch_add(v, std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

}  // namespace flexkv
