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
  kGetCpuHitBlocks,    // of kGetHitBlocks, blocks the CPU tier held at the match
  kGetSsdHitBlocks,    // of kGetHitBlocks, blocks only the SSD tier held (promoted for the get)
  kLoadBytes,          // CPU tier -> engine, bytes of loaded blocks
  kStoreBytes,         // engine -> CPU tier, bytes of stored blocks
  kSsdReadBytes,       // SSD tier -> CPU tier, bytes of promoted blocks
  kSsdWriteBytes,      // CPU tier -> SSD tier, bytes written through
  kRemoteHitBlocks,           // blocks promoted from the remote tier into the CPU tier
  kRemoteMismatchBlocks,      // remote objects that did not verify (wrong, torn, replaced): a miss
  kRemoteReadErrors,          // remote blocks not read (server errors, timeouts, deleted objects)
  kRemoteWrittenBlocks,       // blocks written through to the remote tier
  kRemoteWriteErrors,
  kRemoteWriteSkippedBlocks,  // not written through: the queue was full or the server was down
  kRemoteIndexErrors,         // index (Redis) requests that failed or timed out
  kRemoteRefusedRequests,     // requests not sent: the circuit breaker found the server down
  kRemoteMissBlocks,          // blocks looked up in the remote index that it did not hold (or could not answer)
  kRemoteReadBlocks,          // objects downloaded from the remote tier (before verification)
  kRemoteReadBytes,           // bytes of those objects (header included)
  kRemoteWriteBytes,          // bytes of the objects written through to the remote tier (header included)
  kRemoteEvictedBlocks,       // blocks the remote tier dropped past num_remote_blocks (least recently used)
  kCount,
};

// Latency histograms, in seconds, with the same bucket bounds for all.
enum class Timer : size_t {
  kGetMatch,      // get_match (prepare_load): index lookup and locking
  kPutMatch,      // put_match (prepare_store)
  kLoad,          // a get from launch (or take) to its end, when it completed
  kStore,         // a put from launch (or take) to its end, when it completed
  kPromotion,     // one SSD -> CPU promotion run
  kWriteThrough,  // one write-through job (CPU -> SSD)
  kRemotePromotion,     // one remote -> CPU promotion (download, verification, import)
  kRemoteWriteThrough,  // one write-through job to the remote tier (claim, pack, upload, index)
  kCount,
};

class Histogram {
 public:
  // Upper bounds of the finite buckets (seconds); one more bucket holds the rest.
  static constexpr size_t kBuckets = 18;
  static const double* bounds();
  void observe(double seconds);
  struct Snapshot {
    std::vector<double> bounds;     // kBuckets finite upper bounds
    std::vector<int64_t> counts;    // kBuckets + 1 per-bucket counts (not cumulative), the last +Inf
    double sum = 0.0;
    int64_t count = 0;
  };
  Snapshot snapshot() const;

 private:
  std::array<std::atomic<int64_t>, kBuckets + 1> counts_{};
  std::atomic<int64_t> sum_ns_{0};
};

class Counters {
 public:
  void add(Counter c, int64_t v) { values_[static_cast<size_t>(c)].fetch_add(v, std::memory_order_relaxed); }
  int64_t get(Counter c) const { return values_[static_cast<size_t>(c)].load(std::memory_order_relaxed); }
  // (name, value) of every counter, in declaration order.
  std::vector<std::pair<std::string, int64_t>> snapshot() const;
  // Adds v to the counter called `name`; false when there is none.
  bool add_named(const std::string& name, int64_t v);

  void observe(Timer t, double seconds) { timers_[static_cast<size_t>(t)].observe(seconds); }
  // Observes `seconds` in the timer called `name` (names from histograms()); false when there is none.
  bool observe_named(const std::string& name, double seconds);
  // (name, histogram) of every timer, in declaration order.
  std::vector<std::pair<std::string, Histogram::Snapshot>> histograms() const;

 private:
  std::array<std::atomic<int64_t>, static_cast<size_t>(Counter::kCount)> values_{};
  std::array<Histogram, static_cast<size_t>(Timer::kCount)> timers_{};
};

// Counters of one SSD flow, added to a plane's Counters when the flow ends.
struct FlowCounters {
  int64_t ssd_hit_blocks = 0;
  int64_t ssd_mismatch_blocks = 0;
  int64_t ssd_read_errors = 0;
  int64_t ssd_written_blocks = 0;
  int64_t ssd_write_errors = 0;
  int64_t ssd_write_skipped_blocks = 0;

  // block_bytes sizes the bytes moved (an SSD slot's header is not counted).
  void add_to(Counters& c, int64_t block_bytes) const {
    c.add(Counter::kSsdReadBytes, ssd_hit_blocks * block_bytes);
    c.add(Counter::kSsdWriteBytes, ssd_written_blocks * block_bytes);
    c.add(Counter::kSsdHitBlocks, ssd_hit_blocks);
    c.add(Counter::kSsdMismatchBlocks, ssd_mismatch_blocks);
    c.add(Counter::kSsdReadErrors, ssd_read_errors);
    c.add(Counter::kSsdWrittenBlocks, ssd_written_blocks);
    c.add(Counter::kSsdWriteErrors, ssd_write_errors);
    c.add(Counter::kSsdWriteSkippedBlocks, ssd_write_skipped_blocks);
  }
};

}  // namespace flexkv
