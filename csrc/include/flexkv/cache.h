// Cache: FlexKV for a C++ engine. It finds a token prefix among the blocks it
// holds (CPU tier, and the SSD tier when the config enables it), loads matched
// blocks into the engine's KV memory and stores the engine's blocks, with the
// copies running asynchronously.
//
//   auto options = flexkv::CacheOptions::from_file("flexkv_config.json");
//   auto cache = flexkv::Cache::open(options, model);
//   cache->register_memory(flexkv::EngineMemory::block_major_pool(...));
//   size_t hit = cache->match(tokens, n);                       // leading tokens held
//   auto load = cache->load(tokens, n, computed, engine_blocks, m);
//   ... cache->poll(load.task) or cache->wait(load.task, -1) ...
//   auto store = cache->store(tokens, n, engine_blocks, m);     // when the request ends
//
// Blocks are whole tokens_per_block runs; block i of a sequence is named by a
// hash chain over the namespace and tokens[0 .. (i+1)*tokens_per_block), so a
// block is found only after the same prefix in the same namespace. The
// namespace is the model shape, tokens_per_block and the caller's salt (for
// example a LoRA name or a tenant): two salts never share a block. These are
// FlexKV's one key scheme: the Python KVManager and PageStore with the same
// config and salt name the same blocks, so a block stored here is found there
// (in the same process when they share the cache, or through the SSD tier).
//
// With an SSD tier, stored blocks are written through to SSD in the
// background; a load of blocks found only on SSD brings them up into the CPU
// tier first (the task then runs longer), and blocks whose bytes on SSD do not
// verify are misses. The SSD tier survives restarts.
//
// Ownership: a block being loaded is locked until the load's task finishes, so
// it cannot be evicted under the copy; a block being stored is unreadable until
// its copy finished. The engine must keep its own blocks untouched until the
// task that reads or writes them has finished (poll or wait returned
// kDone or kFailed). A failed task leaves no block half written: a failed
// store is simply not stored, a failed load must be recomputed.
//
// All methods are thread-safe. Errors are exceptions (errors.h: ConfigError,
// TaskError, LayoutError; and std::out_of_range, std::logic_error) whose
// message names the argument or config key.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "flexkv/cache_options.h"
#include "flexkv/engine_memory.h"
#include "flexkv/errors.h"

namespace flexkv {

enum class TaskState { kRunning, kDone, kFailed };

using TaskId = uint64_t;

struct LoadResult {
  TaskId task = 0;            // 0: nothing to load (no task to poll)
  size_t tokens = 0;          // tokens the task loads, a multiple of tokens_per_block
  size_t engine_blocks = 0;   // engine_blocks[0 .. engine_blocks) receive them
};

struct StoreResult {
  TaskId task = 0;            // 0: nothing to copy (no task to poll)
  size_t new_blocks = 0;      // blocks copied from the engine
  size_t cached_blocks = 0;   // leading blocks FlexKV already held or is writing
};

struct CacheStats {
  // CPU tier.
  int64_t capacity_blocks = 0;
  int64_t cached_blocks = 0;
  int64_t free_blocks = 0;
  int64_t locked_blocks = 0;
  int64_t evicted_blocks = 0;
  int64_t match_calls = 0;
  int64_t matched_tokens = 0;
  int64_t loaded_blocks = 0;
  int64_t stored_blocks = 0;
  int64_t failed_tasks = 0;
  int64_t tasks_in_flight = 0;
  // SSD tier (zero without one).
  int64_t ssd_capacity_blocks = 0;
  int64_t ssd_cached_blocks = 0;
  int64_t ssd_hit_blocks = 0;       // blocks brought up from SSD for loads
  int64_t ssd_written_blocks = 0;   // blocks written through to SSD
  int64_t ssd_mismatch_blocks = 0;  // blocks on SSD that did not verify: misses
};

class Cache {
 public:
  // Allocates the CPU tier for `model` (options.resolved(model) blocks) and,
  // when enabled, opens the SSD tier (restoring what an earlier run left).
  // Throws ConfigError naming the key on a bad option or a tier that does not
  // fit, std::invalid_argument on a bad shape, std::runtime_error when the
  // memory cannot be had (the message says how much was asked).
  static std::unique_ptr<Cache> open(const CacheOptions& options, const ModelShape& model);
  // Waits for the copies and write-throughs in flight, then frees the tiers.
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  const ModelShape& model() const;
  int tokens_per_block() const;
  uint64_t block_bytes() const;

  // Describes the engine's KV memory; once, before any load or store. Checks
  // that it matches the model shape (layers, kv_factor, dtype) and, for GPU
  // memory, that it lies on that device. Throws std::invalid_argument naming
  // the mismatch, std::logic_error when called twice.
  void register_memory(const EngineMemory& memory);

  // The number of leading tokens of tokens[0, n) whose blocks FlexKV holds,
  // ready to load from the CPU or the SSD tier (a multiple of
  // tokens_per_block). No side effects beyond statistics. The answer may
  // shrink before load() (eviction).
  size_t match(const int64_t* tokens, size_t n, std::string_view salt = {});

  // Loads the held blocks of tokens[0, n) that follow the first
  // `computed_tokens` (which the engine already has; a multiple of
  // tokens_per_block) into engine_blocks[0], engine_blocks[1], ...; at most
  // n_engine_blocks blocks. Returns what it loads; the blocks are locked until
  // the task finishes. Throws std::out_of_range naming the first engine block id
  // outside the memory, std::invalid_argument on a computed_tokens that is not a
  // block boundary, std::logic_error before register_memory.
  LoadResult load(const int64_t* tokens, size_t n, size_t computed_tokens, const int64_t* engine_blocks,
                  size_t n_engine_blocks, std::string_view salt = {});

  // Stores the whole blocks of tokens[0, n): block i is read from
  // engine_blocks[i], so n_engine_blocks must be at least n / tokens_per_block
  // (more are ignored, e.g. a partial last block). Blocks FlexKV already holds
  // are not copied again. Stops early, storing a shorter prefix, when the tier
  // is full of locked blocks. Throws as load() does.
  StoreResult store(const int64_t* tokens, size_t n, const int64_t* engine_blocks, size_t n_engine_blocks,
                    std::string_view salt = {});

  // The state of a task. A finished task's blocks are committed (store) or
  // unlocked (load) before kDone or kFailed is returned; on kFailed, `error`
  // (if given) receives the reason. A task is reported finished once and then
  // forgotten. Throws std::out_of_range for an unknown task id, or one already
  // reported finished.
  TaskState poll(TaskId task, std::string* error = nullptr);
  // Waits up to timeout_us microseconds (negative: no limit); kRunning on timeout.
  TaskState wait(TaskId task, int64_t timeout_us, std::string* error = nullptr);

  // Waits up to timeout_us microseconds (negative: no limit) until every
  // block stored so far that goes to the SSD tier is written there. False on
  // timeout. Without an SSD tier it returns true at once.
  bool flush(int64_t timeout_us);

  CacheStats stats() const;

 private:
  struct Impl;
  friend struct CacheAccess;  // the library's own way to open a Cache over a cache it already runs
  explicit Cache(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace flexkv
