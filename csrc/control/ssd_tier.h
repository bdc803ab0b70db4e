// SsdTier: whole host blocks on local NVMe behind a radix index of their own.
//
// Blocks reach the SSD only from the CPU tier (write-through after a put) and
// leave it only into the CPU tier (promotion before a get). Every stored block
// carries a header (namespace seed or parent key, position, token ids,
// checksums); a read that does not verify is a miss and the slot is dropped.
// On start the index is rebuilt from the headers (warm restart). Each directory
// is locked for one cache of a fingerprint at a time: two caches writing the
// same slots would only ever turn each other's blocks into misses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "control/cpu_tier.h"
#include "control/key_run.h"
#include "index/radix_index.h"
#include "transfer/io_env.h"
#include "transfer/ssd_store.h"

namespace flexkv {

struct SsdTierOptions {
  std::vector<std::string> dirs;
  int64_t num_blocks = 0;
  uint64_t block_bytes = 0;
  int tokens_per_block = 0;
  std::string fingerprint;          // model, block size and byte count: caches that may share slots
  double evict_ratio = 0.0;
  std::string io_engine = "auto";   // "auto" (io_uring, else threads), "io_uring", "threads"
  unsigned queue_depth = 512;
  std::shared_ptr<IoEnv> env;       // used instead of io_engine when set (tests inject faults here)
  // A warm restart that scans the block headers for longer than this logs its progress (slots scanned of
  // the total, blocks found, rate, ETA) at most this often (0: after every scan batch), then a summary.
  double progress_interval_s = 2.0;
};

// Per block of a read or write: what happened.
struct SsdBatchResult {
  std::vector<SsdStatus> status;
  size_t ok() const;
  size_t io_errors() const;
  size_t mismatches() const;
};

class SsdTier {
 public:
  // Throws ConfigError naming cache_config.ssd_cache_dir (or ssd_io_engine) and the remedy.
  explicit SsdTier(const SsdTierOptions& options);
  ~SsdTier();
  SsdTier(const SsdTier&) = delete;
  SsdTier& operator=(const SsdTier&) = delete;

  RadixIndex& index() { return index_; }
  const RadixIndex& index() const { return index_; }
  int64_t num_blocks() const { return options_.num_blocks; }
  int64_t restored() const { return restored_; }
  std::string io_engine() const { return store_ ? store_->io_env_name() : "closed"; }
  uint64_t slot_bytes() const { return store_ ? store_->slot_bytes() : 0; }

  // Writes CPU blocks to SSD slots (reserved in this tier's index), block k
  // being run position positions[k]; both locked by the caller. A header
  // records the block's place in this tier's index (its parent key, or the
  // run's seed at depth 0, and its depth), which is where a restart puts it.
  SsdBatchResult write(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots, const KeyRun& run,
                       const int64_t* positions, size_t n);
  // Reads SSD slots into CPU blocks and verifies each against the run's key and
  // tokens and its place in this tier's index.
  SsdBatchResult read(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots, const KeyRun& run,
                      const int64_t* positions, size_t n);
  // Makes locked slots unreadable (their bytes were wrong) and erases their headers.
  void drop(const int32_t* slots, size_t n);
  // Drops every block and zeroes the header of every slot ever written (below the high-water mark, one
  // batched 4 KiB write each; evicted slots keep their headers otherwise), so a restart restores nothing
  // of before: a reset (a weight update) must not come back with the old KV. Throws std::logic_error,
  // changing nothing, while a block is locked; std::runtime_error after dropping them if the disk refuses
  // the writes.
  void reset();
  // Closes the files and lets another cache use the directories; the index
  // stays. Reads and writes afterwards throw std::runtime_error.
  void close();

 private:
  std::vector<SsdBlock> blocks_of(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots,
                                  const KeyRun& run, const int64_t* positions, size_t n) const;
  int64_t restore();
  void note_high_water(int64_t end, bool force);

  SsdTierOptions options_;
  std::vector<int> lock_fds_;
  std::string watermark_path_;
  std::unique_ptr<SsdStore> store_;
  RadixIndex index_;
  std::vector<int64_t> zero_tokens_;  // the header tokens of blocks that carry none
  std::mutex mark_mu_;
  int64_t high_water_ = 0;
  int64_t persisted_ = -1;
  int64_t restored_ = 0;
  int64_t scanned_ = 0;         // slots whose headers the restart read
  double restore_seconds_ = 0;  // how long the restart's scan and index rebuild took
};

}  // namespace flexkv
