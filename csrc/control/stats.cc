#include "control/stats.h"

namespace flexkv {

namespace {
const char* const kNames[] = {
    "get_requests",        "get_query_blocks",      "get_hit_blocks",          "get_loaded_blocks",
    "put_requests",        "put_new_blocks",        "put_cached_blocks",       "put_dropped_blocks",
    "put_no_prefix_blocks", "put_stored_blocks",    "lookup_requests",         "lookup_hit_blocks",
    "ssd_hit_blocks",      "ssd_mismatch_blocks",   "ssd_read_errors",         "ssd_written_blocks",
    "ssd_write_errors",    "ssd_write_skipped_blocks", "tasks_failed",         "tasks_cancelled",
    "remote_hit_blocks",   "remote_mismatch_blocks", "remote_read_errors",     "remote_written_blocks",
    "remote_write_errors", "remote_write_skipped_blocks", "remote_index_errors", "remote_refused_requests",
};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Counter::kCount), "a name per counter");
}  // namespace

std::vector<std::pair<std::string, int64_t>> Counters::snapshot() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (size_t i = 0; i < static_cast<size_t>(Counter::kCount); ++i) out.emplace_back(kNames[i], values_[i].load());
  return out;
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
