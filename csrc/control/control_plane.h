// ControlPlane: FlexKV's one cache, which every facade (the Python KVManager
// and PageStore, the C++ Cache) drives. It owns the namespace and key scheme,
// the tiers (CPU in shared memory, SSD, a slot for a remote tier), the task
// table and its state machine (task.h), the promotion and write-through flows,
// eviction, block events and the counters.
//
// Ownership of every block is explicit, in two phases:
//   get_match  (prepare_load)  locks the blocks a get will read, starting any
//                              promotion from SSD in the background;
//   put_match  (prepare_store) reserves blocks for a put's new blocks;
//   then either launch()       (this plane's copy engine moves the bytes and
//                              ends the task), or take() + complete() (another
//                              process moves them: complete_load / complete_store);
//   cancel()                   ends a task that was never launched.
// Every task ends, on every path, with its blocks unlocked (a put's committed).
//
// Threads: any number of facade threads; one SSD read thread (promotions), one
// SSD write thread (write-through), one completion thread per copy engine. No
// lock of this class is held across I/O, a copy-engine call or a log line.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "control/block_events.h"
#include "control/cpu_tier.h"
#include "control/key_run.h"
#include "control/namespace.h"
#include "control/serial_worker.h"
#include "control/ssd_tier.h"
#include "control/stats.h"
#include "control/task.h"
#include "transfer/copy_engine.h"
#include "transfer/rank_order_engine.h"

namespace flexkv {

struct ControlPlaneOptions {
  // The KV shape: its fingerprint names the namespace, its bytes size a block.
  std::string model_fingerprint;
  uint64_t block_bytes = 0;
  int num_layers = 0;
  int tokens_per_block = 16;
  // CPU tier.
  int64_t num_cpu_blocks = 0;
  double evict_ratio = 0.0;
  bool use_hugepage_cpu_buffer = false;
  // SSD tier.
  bool enable_ssd = false;
  int64_t num_ssd_blocks = 0;
  std::vector<std::string> ssd_cache_dirs;
  unsigned ssd_cache_iouring_entries = 512;
  std::string ssd_io_engine = "auto";
  std::shared_ptr<IoEnv> ssd_env;  // replaces ssd_io_engine (fault injection)
  double progress_interval_s = 2.0;  // least seconds between two progress lines of a long warm restart
  // Copy engines.
  bool use_ce_transfer_h2d = false;
  bool use_ce_transfer_d2h = false;
  int transfer_sms_h2d = 8;
  int transfer_sms_d2h = 8;
  int num_copy_threads = 2;
};

struct Lookup {
  size_t cpu = 0;  // leading blocks ready in the CPU tier
  size_t ssd = 0;  // leading blocks ready on SSD
};

struct Match {
  TaskId task = 0;
  std::vector<int64_t> blocks;  // run positions of the blocks the task moves
  size_t covered = 0;           // leading blocks of the run the cache holds (or will) once it ends
};

struct Taken {
  std::vector<int64_t> blocks;     // run positions to copy
  std::vector<int32_t> host_ids;   // their CPU blocks
};

enum class ReportStatus { kSuccess, kNotFound, kUnready, kTimeout, kCancelled, kFailed };

struct Report {
  TaskId task = 0;
  ReportStatus status = ReportStatus::kNotFound;
  size_t seq_len = 0;
  std::vector<int64_t> blocks;  // ended: the run positions the task moved
  std::string error;
};

// What launch() gets for one task: engine block ids, one per block of its
// match; or token slots (block * tokens_per_block + offset), one per token of
// its mask; or the facade's own finding that the argument is malformed.
struct EngineTargets {
  const int64_t* data = nullptr;
  size_t n = 0;
  bool slots = false;
  std::string error;
};

// What a task holds, for tools and tests.
struct TaskView {
  std::string state;
  std::string kind;
  std::vector<int64_t> blocks;
  std::vector<int32_t> host_ids;
  std::vector<int32_t> held;
};

struct IndexCounts {
  RadixIndexStats cpu;
  std::optional<RadixIndexStats> ssd;
};

class ControlPlane {
 public:
  // Allocates the CPU tier, opens (and restores) the SSD tier, starts the SSD
  // threads. Throws ConfigError naming the key at fault.
  static std::shared_ptr<ControlPlane> open(ControlPlaneOptions options);
  // The same, for a host that owns the object its own way (the Python module
  // destroys it with the GIL released).
  static std::unique_ptr<ControlPlane> create(ControlPlaneOptions options);
  ~ControlPlane();
  ControlPlane(const ControlPlane&) = delete;
  ControlPlane& operator=(const ControlPlane&) = delete;

  // Refuses new tasks and launches, cancels tasks not launched, waits for
  // copies and promotions in flight and for write-through, and stops the
  // threads and copy engines. Tasks taken by another process are not waited
  // for (their complete() still works). The tiers are freed with the object.
  // Idempotent.
  void shutdown();
  bool closed() const;

  const ControlPlaneOptions& options() const { return options_; }
  int tokens_per_block() const { return options_.tokens_per_block; }
  TierInfo tier_info() const;
  bool has_ssd() const { return ssd_ != nullptr; }
  int64_t ssd_restored() const;
  std::string ssd_io_engine() const;

  // ------------------------------------------------------------------- keys
  BlockKey seed(const std::string& layout_tag, const std::vector<std::string>& salts) const;
  // A chain from the root over the whole blocks of `tokens`.
  std::shared_ptr<KeyRun> token_run(BlockKey seed, const int64_t* tokens, size_t n_tokens) const;
  // A chain from the root keyed by an engine's block hashes (salted by the
  // seed), one per whole block of `tokens` (which headers and events record).
  std::shared_ptr<KeyRun> hash_run(BlockKey seed, const BlockKey* hashes, size_t n_hashes, const int64_t* tokens,
                                   size_t n_tokens) const;
  // Keys that each name a block on their own (already salted page keys).
  std::shared_ptr<KeyRun> entry_run(BlockKey seed, const BlockKey* keys, size_t n) const;
  // Page keys that continue `parent` (a key the CPU tier holds, or nullptr for
  // a sequence start); entries when the CPU tier does not hold the parent.
  std::shared_ptr<KeyRun> page_run(BlockKey seed, const BlockKey* keys, size_t n, const BlockKey* parent) const;

  // --------------------------------------------------------------- protocol
  Lookup lookup(const KeyRun& run);
  // Locks the leading cached blocks of run[first, ...); SSD-only blocks start
  // coming up at once. The task moves blocks [first, end).
  Match get_match(std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len);
  // Reserves CPU blocks for the blocks of run[first, ...) the cache lacks.
  Match put_match(std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len);
  // Brings the SSD-only blocks of the run up into the CPU tier; no launch.
  TaskId prefetch(std::shared_ptr<const KeyRun> run, size_t seq_len);
  // Marks the run's cached blocks recently used.
  void touch(const KeyRun& run);

  // Starts the copies of matched tasks with this plane's copy engine for
  // `layout`. All or nothing: an unknown or already launched id launches
  // nothing (TaskError); bad targets fail every task of the call (TaskError).
  void launch(const std::vector<TaskId>& ids, const std::vector<EngineTargets>& targets, int32_t layout,
              bool layerwise);
  // Claims a matched task for a copy made elsewhere: waits up to timeout_s for
  // blocks coming up from SSD (0: never waits). Blocks that failed to come up
  // are left out; if the reads still run at the timeout, it hands out nothing
  // and the task ends failed.
  Taken take(TaskId id, double timeout_s);
  // take() without waiting or giving up: nullopt (the task unchanged) while its
  // blocks still come up from SSD. A scheduler thread polls this instead of blocking.
  std::optional<Taken> try_take(TaskId id);
  // Ends a taken task: ok commits a put's blocks, anything else unlocks them.
  void complete(TaskId id, bool ok, const std::string& error);
  void cancel(const std::vector<TaskId>& ids);

  std::vector<Report> wait(const std::vector<TaskId>& ids, double timeout_s, bool completely);
  std::vector<Report> try_wait(const std::vector<TaskId>& ids);
  // One task's report, running or not (kTimeout while it runs).
  Report try_wait_one(TaskId id);
  // Tasks launched or taken that have not ended.
  size_t tasks_in_flight() const;
  // Waits until `layer` of a launched get has arrived (with `stream`, a
  // cudaStream_t, makes it wait instead). False if the task ended without
  // completing or timeout_s passed.
  bool wait_layer(TaskId id, int32_t layer, void* stream, double timeout_s);

  // Waits up to timeout_s until no write-through is pending (every stored
  // block that will reach the SSD tier is there). False on timeout.
  bool flush(double timeout_s);

  // Drops every cached block from the indexes, and zeroes the header of every
  // SSD slot written so far so that a restart restores none of them (one 4 KiB
  // write per slot, batched, under the plane's lock: reset is stop-the-world).
  // TaskError while a task holds blocks.
  void reset();

  // ------------------------------------------------------------ engine memory
  // Registers engine memory (device -1: host) with the copy engine for its
  // device; returns the handle launch() takes. LayoutError when it does not fit.
  int32_t register_layout(const EngineLayout& layout, int device);
  // TaskError while copies on it are in flight.
  void unregister_layout(int32_t handle);
  // KV memory of `num_blocks` blocks in other processes (an engine's
  // tensor-parallel ranks, each copying its own slice with its own data plane):
  // a launch on the handle becomes an order that next_rank_order hands to a
  // dispatcher, which sends it to the ranks and ends it with finish_rank_order
  // once every rank has copied ("" then, else why not). The task waits in
  // kCopying meanwhile, like any copy.
  int32_t register_rank_layout(int64_t num_blocks);
  std::optional<RankOrder> next_rank_order(int64_t timeout_us);
  void finish_rank_order(uint64_t job, const std::string& error);

  // -------------------------------------------------- flows outside the core
  // A tier kept outside the core (the remote tier, in Python) moves whole
  // blocks as object images: the SSD block header (fingerprint, key, parent,
  // position, token ids, checksums) followed by the payload, object_bytes() each.
  uint64_t object_bytes() const;
  // XXH3-64 of the model fingerprint, block size and bytes, as the headers record it: objects of
  // planes with the same value are interchangeable (salts and layout tags live in the keys).
  uint64_t object_fingerprint() const;
  // Images of the run's blocks [start, ...) ready in the CPU tier, up to `stop`
  // (the leading ones; the blocks before `start` must be ready too), packed with
  // the blocks locked so no eviction rewrites them meanwhile. Returns how many.
  size_t export_blocks(const KeyRun& run, size_t start, size_t stop, std::vector<uint8_t>* out);
  // For a put task taken with take(): verifies objects[i] against the task's
  // block i (header fields, token ids, payload checksum) and copies its payload
  // into the task's CPU block. 1 per verified block, 0 otherwise; the caller
  // then completes the task. TaskError unless the task is taken by the caller.
  std::vector<uint8_t> import_blocks(TaskId id, const uint8_t* const* objects, const size_t* sizes, size_t n);
  // Adds a flow's counts to the plane's counters (names from counters());
  // std::invalid_argument naming an unknown one.
  void add_counters(const std::vector<std::pair<std::string, int64_t>>& values);
  // Records one latency of a flow run outside the plane (names from histograms());
  // std::invalid_argument naming an unknown one.
  void observe_latency(const std::string& name, double seconds);

  // ------------------------------------------------------------ observation
  std::vector<std::pair<std::string, int64_t>> counters() const;
  // Latency histograms (get_match, put_match, load, store, promotion, write_through, remote_promotion,
  // remote_write_through).
  std::vector<std::pair<std::string, Histogram::Snapshot>> histograms() const;
  // Queue depths now: tasks in flight, promotions, write-through backlog, SSD queues.
  std::vector<std::pair<std::string, int64_t>> gauges() const;
  IndexCounts index_counts() const;
  void enable_events(size_t capacity) { events_.enable(capacity); }
  std::vector<BlockEvent> take_events() { return events_.take(); }
  uint64_t events_dropped() const { return events_.dropped(); }
  // Throws std::logic_error naming the first broken invariant of an index.
  void check_consistency() const;
  // Blocks locked in the CPU / SSD index (tests: 0 once every task has ended).
  std::pair<int64_t, int64_t> locked_blocks() const;
  // A task a caller may still name, or nullopt.
  std::optional<TaskView> inspect(TaskId id);
  // The SSD slots of the run's leading blocks on SSD (tools: where a block lives on disk).
  std::vector<int32_t> ssd_slots(const KeyRun& run);
  uint64_t ssd_slot_bytes() const;
  // (ready, lock count) of a CPU block id.
  std::pair<bool, int32_t> cpu_block(int32_t id) const;
  // Makes the run's cached CPU blocks from position `start` on unreadable, as
  // if they had been lost (the next store rewrites them); returns how many.
  size_t invalidate(const KeyRun& run, size_t start);
  // While paused, finished copies are not ended (their tasks stay kCopying);
  // resuming ends them. A clock for tests that observe a task mid-flight.
  void pause_completions(bool paused);

 private:
  struct Engine {
    std::shared_ptr<CopyEngine> engine;
    std::thread collector;
  };
  struct Layout {
    CopyEngine* engine = nullptr;
    int32_t id = -1;
    int64_t num_blocks = 0;
    bool cuda = false;
  };

  explicit ControlPlane(ControlPlaneOptions options);
  // A task callers may still name (not one reported or completed already); with mu_ held.
  Task* find(TaskId id);
  // Any task of the table, for the flows that end tasks nobody names any more; with mu_ held.
  Task* find_any(TaskId id);
  void require_open(const char* call) const;  // with mu_ held
  // Hands a new task's promotion to the SSD read thread, or, while shutting down,
  // gives its blocks back and ends it; releases `lock`.
  void begin_promotion(Task* t, std::unique_lock<std::mutex>& lock);
  Task& add_task(Task task);  // with mu_ held
  void trim_ended();          // with mu_ held
  void end(Task* t, Outcome outcome);
  // A completed put's write-through, queued once its task is kWritingThrough.
  struct WriteThrough {
    TaskId task = 0;
    std::shared_ptr<const KeyRun> run;
    size_t n = 0;
    std::vector<int32_t> own;  // CPU blocks held locked until written
  };
  std::optional<WriteThrough> commit_put(Task* t);
  void queue_write_through(WriteThrough w);
  void on_promoted(TaskId id, size_t arrived, FlowCounters counters);
  void submit_copy(Task* t, std::unique_lock<std::mutex>& lock);
  void on_copy_done(const CopyCompletion& c);
  void collect(CopyEngine* engine);
  void write_through_job(TaskId id, std::shared_ptr<const KeyRun> run, size_t n, std::vector<int32_t> own);
  std::vector<int64_t> engine_blocks_of(const Task& t, const EngineTargets& targets, const Layout* layout) const;
  Report report(TaskId id);  // with mu_ held
  CopyEngine* engine_for(int device);  // with engines_mu_ held

  ControlPlaneOptions options_;
  NamespaceSpec ns_;
  BlockEventLog events_;
  Counters stats_;
  std::unique_ptr<CpuTier> cpu_;
  std::unique_ptr<SsdTier> ssd_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<TaskId, Task> tasks_;
  TaskId next_task_ = 1;
  bool closing_ = false;
  bool closed_ = false;
  int launching_ = 0;   // launch/take calls between claiming tasks and queuing their copies
  int promoting_ = 0;   // promotions in flight
  size_t write_backlog_ = 0;  // CPU blocks held locked until their write-through
  size_t write_backlog_limit_ = 1;

  std::mutex engines_mu_;  // engines_ and layouts_
  std::map<int, Engine> engines_;  // by device, -1 the host, kRankDevice the ranks' order queue
  std::shared_ptr<RankOrderEngine> rank_engine_;  // engines_[kRankDevice]'s engine, once made
  static constexpr int kRankDevice = -2;
  std::map<int32_t, Layout> layouts_;
  int32_t next_layout_ = 1;
  bool completions_paused_ = false;           // guarded by mu_
  std::vector<CopyCompletion> held_completions_;  // guarded by mu_

  std::unique_ptr<SerialWorker> ssd_reads_;
  std::unique_ptr<SerialWorker> ssd_writes_;
};

}  // namespace flexkv
