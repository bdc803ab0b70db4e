#include "control/stats.h"

namespace flexkv {

std::vector<std::pair<std::string, int64_t>> Counters::snapshot() const {
  static const char* const kNames[] = {
      "get_requests",        "get_query_blocks",      "get_hit_blocks",          "get_loaded_blocks",
      "put_requests",        "put_new_blocks",        "put_cached_blocks",       "put_dropped_blocks",
      "put_no_prefix_blocks", "put_stored_blocks",    "lookup_requests",         "lookup_hit_blocks",
      "ssd_hit_blocks",      "ssd_mismatch_blocks",   "ssd_read_errors",         "ssd_written_blocks",
      "ssd_write_errors",    "ssd_write_skipped_blocks", "tasks_failed",         "tasks_cancelled",
  };
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == static_cast<size_t>(Counter::kCount),
                "a name per counter");
  std::vector<std::pair<std::string, int64_t>> out;
  for (size_t i = 0; i < static_cast<size_t>(Counter::kCount); ++i) out.emplace_back(kNames[i], values_[i].load());
  return out;
}

}  // namespace flexkv
