// Counters of one control plane, counted once for every facade over it.
// Tokens are blocks x tokens_per_block; the facades report both.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace flexkv {

enum class Counter : size_t {
  kGetRequests,
  kGetQueryBlocks,     // whole blocks a get asked for
  kGetHitBlocks,       // of those, blocks it found (CPU or SSD)
  kGetLoadedBlocks,    // blocks that reached the engine
  kPutRequests,
  kPutNewBlocks,       // blocks a put stores
  kPutCachedBlocks,    // skipped: cached or being stored by another put
  kPutDroppedBlocks,   // not stored: no block could be freed for them
  kPutNoPrefixBlocks,  // not stored: the blocks before the put's mask are not cached
  kPutStoredBlocks,    // blocks that became readable in the CPU tier
  kLookupRequests,     // lookups without a task (lookup, PageStore.exists)
  kLookupHitBlocks,
  kSsdHitBlocks,       // blocks promoted from SSD into the CPU tier
  kSsdMismatchBlocks,  // blocks whose bytes on SSD were wrong: dropped, a miss
  kSsdReadErrors,
  kSsdWrittenBlocks,
  kSsdWriteErrors,
  kSsdWriteSkippedBlocks,  // not written through: the queue was full or the prefix never got ready
  kTasksFailed,
  kTasksCancelled,
  kRemoteHitBlocks,           // blocks promoted from the remote tier into the CPU tier
  kRemoteMismatchBlocks,      // remote objects that did not verify (wrong, torn, replaced): a miss
  kRemoteReadErrors,          // remote blocks not read (server errors, timeouts, deleted objects)
  kRemoteWrittenBlocks,       // blocks written through to the remote tier
  kRemoteWriteErrors,
  kRemoteWriteSkippedBlocks,  // not written through: the queue was full or the server was down
  kRemoteIndexErrors,         // index (Redis) requests that failed or timed out
  kRemoteRefusedRequests,     // requests not sent: the circuit breaker found the server down
  kCount,
};

class Counters {
 public:
  void add(Counter c, int64_t v) { values_[static_cast<size_t>(c)].fetch_add(v, std::memory_order_relaxed); }
  int64_t get(Counter c) const { return values_[static_cast<size_t>(c)].load(std::memory_order_relaxed); }
  // (name, value) of every counter, in declaration order.
  std::vector<std::pair<std::string, int64_t>> snapshot() const;
  // Adds v to the counter called `name`; false when there is none.
  bool add_named(const std::string& name, int64_t v);

 private:
  std::array<std::atomic<int64_t>, static_cast<size_t>(Counter::kCount)> values_{};
};

// Counters of one SSD flow, added to a plane's Counters when the flow ends.
struct FlowCounters {
  int64_t ssd_hit_blocks = 0;
  int64_t ssd_mismatch_blocks = 0;
  int64_t ssd_read_errors = 0;
  int64_t ssd_written_blocks = 0;
  int64_t ssd_write_errors = 0;
  int64_t ssd_write_skipped_blocks = 0;

  void add_to(Counters& c) const {
    c.add(Counter::kSsdHitBlocks, ssd_hit_blocks);
    c.add(Counter::kSsdMismatchBlocks, ssd_mismatch_blocks);
    c.add(Counter::kSsdReadErrors, ssd_read_errors);
    c.add(Counter::kSsdWrittenBlocks, ssd_written_blocks);
    c.add(Counter::kSsdWriteErrors, ssd_write_errors);
    c.add(Counter::kSsdWriteSkippedBlocks, ssd_write_skipped_blocks);
  }
};

}  // namespace flexkv
