// ControlPlane: opening and closing, keys, matching, lookups, reset and engine memory.
// The task life after the match (launch, copies, promotions, ends, waits) is in
// control_plane_tasks.cc.
#include "control/control_plane.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "control/log.h"
#include "control/tier_flows.h"
#include "flexkv/errors.h"

namespace flexkv {
namespace {

constexpr uint64_t kIoAlign = 4096;           // O_DIRECT buffers
constexpr int64_t kMaxBlocks = 2147483647;    // block ids are int32
constexpr uint64_t kCopyEngineMinChunk = 64 << 10;

std::string ssd_fingerprint(const ControlPlaneOptions& o) {
  // Slots are shared by every cache of the same model, block size and bytes; salts and layout tags live in the keys.
  return "flexkv-ssd-v2;" + o.model_fingerprint + ";tpb=" + std::to_string(o.tokens_per_block) +
         ";bytes=" + std::to_string(o.block_bytes);
}

}  // namespace

std::shared_ptr<ControlPlane> ControlPlane::open(ControlPlaneOptions options) { return create(std::move(options)); }

std::unique_ptr<ControlPlane> ControlPlane::create(ControlPlaneOptions options) {
  if (options.tokens_per_block < 1) {
    throw ConfigError("cache_config.tokens_per_block must be at least 1", "cache_config.tokens_per_block");
  }
  if (options.block_bytes == 0) throw ConfigError("the model's KV shape gives blocks of 0 bytes", "model_config");
  if (options.num_cpu_blocks < 1 || options.num_cpu_blocks > kMaxBlocks) {
    throw ConfigError("cache_config.num_cpu_blocks = " + std::to_string(options.num_cpu_blocks) + " is outside 1.." +
                          std::to_string(kMaxBlocks) + ", what one tier can index; use larger blocks "
                          "(tokens_per_block) or fewer of them", "cache_config.num_cpu_blocks");
  }
  if (options.enable_ssd && (options.num_ssd_blocks < 1 || options.num_ssd_blocks > kMaxBlocks)) {
    throw ConfigError("cache_config.num_ssd_blocks = " + std::to_string(options.num_ssd_blocks) + " is outside 1.." +
                          std::to_string(kMaxBlocks), "cache_config.num_ssd_blocks");
  }
  return std::unique_ptr<ControlPlane>(new ControlPlane(std::move(options)));
}

ControlPlane::ControlPlane(ControlPlaneOptions options) : options_(std::move(options)) {
  ns_ = NamespaceSpec{options_.model_fingerprint, options_.tokens_per_block, ""};
  if (options_.enable_ssd) {
    SsdTierOptions so;
    so.dirs = options_.ssd_cache_dirs;
    so.num_blocks = options_.num_ssd_blocks;
    so.block_bytes = options_.block_bytes;
    so.tokens_per_block = options_.tokens_per_block;
    so.fingerprint = ssd_fingerprint(options_);
    so.evict_ratio = options_.evict_ratio;
    so.io_engine = options_.ssd_io_engine;
    so.queue_depth = options_.ssd_cache_iouring_entries;
    so.env = options_.ssd_env;
    so.progress_interval_s = options_.progress_interval_s;
    ssd_ = std::make_unique<SsdTier>(so);
    ssd_->index().set_listener(events_.listener(Tier::kSsd));
  }
  cpu_ = std::make_unique<CpuTier>(options_.num_cpu_blocks, options_.block_bytes, ssd_ ? kIoAlign : 1,
                                   options_.evict_ratio, options_.use_hugepage_cpu_buffer);
  cpu_->index().set_listener(events_.listener(Tier::kCpu));
  write_backlog_limit_ = std::max<size_t>(1, static_cast<size_t>(options_.num_cpu_blocks) / 4);
  if (ssd_) {
    ssd_reads_ = std::make_unique<SerialWorker>();
    ssd_writes_ = std::make_unique<SerialWorker>();
  }
  log_line(LogLevel::kInfo, "FlexKV CPU tier: " + std::to_string(options_.num_cpu_blocks) + " blocks x " +
                                std::to_string(options_.block_bytes) + " bytes, shared at " + cpu_->info().socket);
}

ControlPlane::~ControlPlane() {
  try {
    shutdown();
  } catch (const std::exception& e) {
    log_line(LogLevel::kError, std::string("FlexKV: shutdown failed: ") + e.what());
  }
}

bool ControlPlane::closed() const {
  std::lock_guard<std::mutex> g(mu_);
  return closing_;
}

void ControlPlane::shutdown() {
  std::vector<TaskId> unlaunched;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (closing_) {
      cv_.wait(lock, [this] { return closed_; });
      return;
    }
    closing_ = true;
    cv_.wait(lock, [this] { return launching_ == 0; });
    for (auto& [id, t] : tasks_) {
      if (t.state == TaskStage::kMatched || t.state == TaskStage::kPromoting) unlaunched.push_back(id);
    }
  }
  cancel(unlaunched);
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] {
      if (promoting_ > 0) return false;
      for (const auto& [id, t] : tasks_) {
        switch (t.state) {
          case TaskStage::kClaimed:
          case TaskStage::kWaitingForPromotion:
          case TaskStage::kEndingAfterPromotion:
          case TaskStage::kCopying:
          case TaskStage::kFinishing:
            return false;
          default:
            break;
        }
      }
      return true;
    });
  }
  if (ssd_reads_) ssd_reads_->stop();
  if (ssd_writes_) ssd_writes_->stop();  // write-throughs finish before the CPU tier goes
  std::map<int, Engine> engines;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    engines.swap(engines_);
    layouts_.clear();
  }
  std::shared_ptr<RankOrderEngine> ranks;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    ranks.swap(rank_engine_);
  }
  if (ranks) ranks->close();  // a dispatcher waiting for orders returns
  for (auto& [device, e] : engines) {
    e.engine->interrupt();
    if (e.collector.joinable()) e.collector.join();
    e.engine.reset();  // a GPU engine unpins the CPU tier before the tier is unmapped
  }
  // The tiers' memory and files go now (the SSD directories are free for the next cache); their indexes
  // stay for the counters and for waits on tasks that ended.
  if (ssd_) ssd_->close();
  cpu_->close();
  {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

TierInfo ControlPlane::tier_info() const {
  return cpu_->info();
}

int64_t ControlPlane::ssd_restored() const { return ssd_ ? ssd_->restored() : 0; }

std::string ControlPlane::ssd_io_engine() const { return ssd_ ? ssd_->io_engine() : ""; }

// ------------------------------------------------------------------------- keys

BlockKey ControlPlane::seed(const std::string& layout_tag, const std::vector<std::string>& salts) const {
  NamespaceSpec spec = ns_;
  spec.layout_tag = layout_tag;
  return namespace_seed(spec, salts);
}

std::shared_ptr<KeyRun> ControlPlane::token_run(BlockKey seed, const int64_t* tokens, size_t n_tokens) const {
  auto run = std::make_shared<KeyRun>();
  const auto tpb = static_cast<size_t>(options_.tokens_per_block);
  run->seed = seed;
  run->tokens_per_block = options_.tokens_per_block;
  run->keys.resize(n_tokens / tpb);
  chain_block_keys(seed, tokens, n_tokens, tpb, run->keys.data());
  // Only the SSD tier's headers and block events read token ids: without them, copying 128K ids costs ~25 us.
  if (ssd_ || events_.enabled()) run->tokens.assign(tokens, tokens + run->keys.size() * tpb);
  return run;
}

std::shared_ptr<KeyRun> ControlPlane::hash_run(BlockKey seed, const BlockKey* hashes, size_t n_hashes,
                                               const int64_t* tokens, size_t n_tokens) const {
  const auto tpb = static_cast<size_t>(options_.tokens_per_block);
  const size_t n = std::min(n_hashes, n_tokens / tpb);
  auto run = std::make_shared<KeyRun>();
  run->seed = seed;
  run->tokens_per_block = options_.tokens_per_block;
  run->keys.resize(n);
  salt_block_hashes(seed, hashes, n, run->keys.data());
  if (ssd_ || events_.enabled()) run->tokens.assign(tokens, tokens + n * tpb);
  return run;
}

std::shared_ptr<KeyRun> ControlPlane::entry_run(BlockKey seed, const BlockKey* keys, size_t n) const {
  auto run = std::make_shared<KeyRun>();
  run->shape = KeyRun::Shape::kEntries;
  run->seed = seed;
  run->tokens_per_block = options_.tokens_per_block;
  run->keys.assign(keys, keys + n);
  return run;
}

std::shared_ptr<KeyRun> ControlPlane::page_run(BlockKey seed, const BlockKey* keys, size_t n,
                                               const BlockKey* parent) const {
  auto run = entry_run(seed, keys, n);
  if (parent == nullptr) {
    run->shape = KeyRun::Shape::kChain;
    return run;
  }
  const int32_t id = cpu_->index().find(*parent);
  if (id < 0) return run;  // the prefix is gone: each page stands alone
  run->shape = KeyRun::Shape::kChain;
  run->has_parent = true;
  run->parent = *parent;
  run->first_position = cpu_->index().depth(id) + 1;
  return run;
}

// -------------------------------------------------------------------- matching

Task* ControlPlane::find_any(TaskId id) {
  auto it = tasks_.find(id);
  return it == tasks_.end() ? nullptr : &it->second;
}

Task* ControlPlane::find(TaskId id) {
  Task* t = find_any(id);
  return t == nullptr || t->detached ? nullptr : t;
}

void ControlPlane::require_open(const char* call) const {
  if (closing_) throw TaskError(std::string(call) + ": the cache is shut down (or shutting down)");
}

Task& ControlPlane::add_task(Task task) {
  task.id = next_task_++;
  const TaskId id = task.id;
  Task& t = tasks_.emplace(id, std::move(task)).first->second;
  if (tasks_.size() > 100000) trim_ended();
  return t;
}

void ControlPlane::trim_ended() {
  // Forgets the oldest ended tasks nobody collected, a tenth of the table at a time.
  size_t excess = tasks_.size() - 90000;
  for (auto it = tasks_.begin(); it != tasks_.end() && excess > 0;) {
    if (it->second.ended()) {
      it = tasks_.erase(it);
      --excess;
    } else {
      ++it;
    }
  }
}

Lookup ControlPlane::lookup(const KeyRun& run) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("lookup");
  }
  Lookup out;
  out.cpu = run_match(cpu_->index(), run);
  if (ssd_) {
    KeyRun on_ssd = run;
    if (run.chain() && run.has_parent && ssd_->index().find(run.parent) < 0) on_ssd.shape = KeyRun::Shape::kEntries;
    out.ssd = run_match(ssd_->index(), on_ssd);
  }
  stats_.add(Counter::kLookupRequests, 1);
  stats_.add(Counter::kLookupHitBlocks, static_cast<int64_t>(std::max(out.cpu, out.ssd)));
  return out;
}

void ControlPlane::touch(const KeyRun& run) {
  if (run.chain()) {
    cpu_->index().touch(run.keys.data(), run.size(), run.index_parent());
  } else {
    std::vector<int32_t> ids(run.size());
    const size_t got = cpu_->index().acquire_each(run.keys.data(), run.size(), ids.data());
    cpu_->index().release(ids.data(), got);
  }
}

Match ControlPlane::get_match(std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len) {
  const Task::Clock::time_point started = Task::Clock::now();
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("get_match");
  }
  const size_t n = run->size();
  first = std::min(first, n);
  std::vector<int32_t> load(n - first);
  const size_t n_cpu = run_acquire(cpu_->index(), *run, first, n, load.data());
  load.resize(n_cpu > first ? n_cpu - first : 0);
  std::optional<Promotion> promotion;
  if (ssd_ && n_cpu < n) {
    promotion = plan_promotion(*cpu_, *ssd_, *run, n_cpu);
    if (promotion && promotion->stop <= first) {  // only blocks the engine already has
      abandon_promotion(*cpu_, *ssd_, *promotion);
      promotion.reset();
    }
  }
  Task t;
  t.kind = TaskKind::kGet;
  t.run = run;
  t.seq_len = seq_len;
  t.held = std::move(load);
  size_t end = std::max(first, n_cpu);
  if (promotion) {
    t.held.insert(t.held.end(), promotion->cpu_ids.begin(), promotion->cpu_ids.end());
    end = std::max(first, promotion->stop);
  }
  for (size_t b = first; b < end; ++b) t.blocks.push_back(static_cast<int64_t>(b));
  t.host_ids.assign(t.held.end() - static_cast<std::ptrdiff_t>(end - first), t.held.end());
  t.promised = t.blocks.size();
  t.state = t.held.empty() ? TaskStage::kDone : promotion ? TaskStage::kPromoting : TaskStage::kMatched;
  t.promotion = std::move(promotion);
  stats_.add(Counter::kGetRequests, 1);
  stats_.add(Counter::kGetQueryBlocks, static_cast<int64_t>(n - first));
  stats_.add(Counter::kGetHitBlocks, static_cast<int64_t>(end - first));
  const size_t cpu_hits = n_cpu > first ? n_cpu - first : 0;
  stats_.add(Counter::kGetCpuHitBlocks, static_cast<int64_t>(cpu_hits));
  stats_.add(Counter::kGetSsdHitBlocks, static_cast<int64_t>(end - first - cpu_hits));
  stats_.observe(Timer::kGetMatch, std::chrono::duration<double>(Task::Clock::now() - started).count());
  std::unique_lock<std::mutex> lock(mu_);
  Task& task = add_task(std::move(t));
  Match m{task.id, task.blocks, end};  // what is promised, before a fast promotion can trim it
  if (task.promotion) begin_promotion(&task, lock);
  return m;
}

Match ControlPlane::put_match(std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len) {
  const Task::Clock::time_point started = Task::Clock::now();
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("put_match");
  }
  const size_t n = run->size();
  std::vector<int32_t> ids(n);
  std::vector<uint8_t> is_new(n, 0);
  const size_t handled = first >= n ? 0 : run_reserve(cpu_->index(), *run, first, n, ids.data(), is_new.data());
  Task t;
  t.kind = TaskKind::kPut;
  t.run = run;
  t.seq_len = seq_len;
  for (size_t i = 0; i < handled; ++i) {
    if (!is_new[i]) continue;
    t.blocks.push_back(static_cast<int64_t>(i));
    t.host_ids.push_back(ids[i]);
  }
  t.held = t.host_ids;
  t.promised = t.blocks.size();
  t.state = t.held.empty() ? TaskStage::kDone : TaskStage::kMatched;
  stats_.add(Counter::kPutRequests, 1);
  stats_.add(Counter::kPutNewBlocks, static_cast<int64_t>(t.blocks.size()));
  if (first < n) {
    if (handled < first) {
      stats_.add(Counter::kPutNoPrefixBlocks, static_cast<int64_t>(n - first));
    } else {
      stats_.add(Counter::kPutCachedBlocks, static_cast<int64_t>(handled - first - t.blocks.size()));
      stats_.add(Counter::kPutDroppedBlocks, static_cast<int64_t>(n - handled));
    }
  }
  stats_.observe(Timer::kPutMatch, std::chrono::duration<double>(Task::Clock::now() - started).count());
  std::lock_guard<std::mutex> g(mu_);
  Task& task = add_task(std::move(t));
  return Match{task.id, task.blocks, handled};
}

TaskId ControlPlane::prefetch(std::shared_ptr<const KeyRun> run, size_t seq_len) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("prefetch_async");
  }
  std::optional<Promotion> promotion;
  if (ssd_) {
    const size_t n_cpu = run_match(cpu_->index(), *run);
    if (n_cpu < run->size()) promotion = plan_promotion(*cpu_, *ssd_, *run, n_cpu);
  }
  Task t;
  t.kind = TaskKind::kPrefetch;
  t.run = run;
  t.seq_len = seq_len;
  if (promotion) {
    t.held = promotion->cpu_ids;
    t.state = TaskStage::kWaitingForPromotion;  // running from the start: a prefetch has no launch
    t.launched = Task::Clock::now();
  } else {
    t.state = TaskStage::kDone;
  }
  t.promotion = std::move(promotion);
  std::unique_lock<std::mutex> lock(mu_);
  Task& task = add_task(std::move(t));
  const TaskId id = task.id;
  if (task.promotion) begin_promotion(&task, lock);
  return id;
}

void ControlPlane::reset() {
  std::lock_guard<std::mutex> g(mu_);
  require_open("reset");
  std::vector<TaskId> busy;
  for (const auto& [id, t] : tasks_) {
    if (!t.settled()) busy.push_back(id);
  }
  if (!busy.empty()) {
    std::string list;
    for (size_t i = 0; i < busy.size() && i < 8; ++i) list += (i ? ", " : "") + std::to_string(busy[i]);
    throw TaskError("reset: tasks [" + list + "] are unfinished; wait for or cancel them first");
  }
  try {
    cpu_->index().reset();
    if (ssd_) ssd_->reset();
  } catch (const std::logic_error& e) {  // a match on another thread locked blocks just now
    throw TaskError(std::string("reset: ") + e.what() + "; wait for or cancel the tasks holding them first");
  } catch (const std::runtime_error& e) {  // the SSD refused the header writes: the indexes are empty already
    throw TaskError(std::string("reset: the cache is empty, but the SSD tier's headers could not be zeroed (") +
                    e.what() + "): a restart may restore blocks from before the reset; delete the SSD directory "
                    "before restarting");
  }
}

// ----------------------------------------------------------------- engine memory

CopyEngine* ControlPlane::engine_for(int device) {
  auto it = engines_.find(device);
  return it == engines_.end() ? nullptr : it->second.engine.get();
}

int32_t ControlPlane::register_layout(const EngineLayout& layout, int device) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("register_kv_caches");
  }
  CopyEngine* engine = nullptr;
  {
    std::lock_guard<std::mutex> g(engines_mu_);
    engine = engine_for(device);
  }
  if (engine == nullptr) {
    // Made outside the lock: a GPU engine's creation and the pinning of the CPU tier are CUDA calls.
    std::unique_ptr<CopyEngine> fresh;
    try {
      if (device < 0) {
        fresh = make_host_copy_engine(options_.num_copy_threads);
      } else {
        GpuCopyOptions o;
        o.device = device;
        o.path_h2d = options_.use_ce_transfer_h2d ? GpuCopyPath::kCopyEngine : GpuCopyPath::kStaged;
        o.path_d2h = options_.use_ce_transfer_d2h ? GpuCopyPath::kCopyEngine : GpuCopyPath::kStaged;
        o.sms_h2d = options_.transfer_sms_h2d;
        o.sms_d2h = options_.transfer_sms_d2h;
        fresh = make_gpu_copy_engine(o);
      }
      fresh->register_host(cpu_->base(), cpu_->size());
    } catch (const std::exception& e) {
      const std::string where = device < 0 ? "host memory" : "cuda:" + std::to_string(device);
      throw LayoutError("the data plane could not start for " + where + ": " + e.what());
    }
    std::lock_guard<std::mutex> g(engines_mu_);
    engine = engine_for(device);
    if (engine == nullptr) {  // else another registration won the race: `fresh` goes
      engine = fresh.get();
      Engine& slot = engines_[device];
      slot.engine = std::move(fresh);
      slot.collector = std::thread([this, engine] { collect(engine); });
    }
  }
  int32_t id;
  try {
    id = engine->register_layout(layout, cpu_->region());
  } catch (const std::exception& e) {
    throw LayoutError(std::string("the registered KV memory does not fit the copy engine: ") + e.what());
  }
  if (device >= 0 && (options_.use_ce_transfer_h2d || options_.use_ce_transfer_d2h)) {
    uint64_t smallest = UINT64_MAX;
    for (const auto& s : layout.segments) smallest = std::min(smallest, s.bytes);
    if (smallest < kCopyEngineMinChunk) {
      log_line(LogLevel::kWarning, "use_ce_transfer_*: the engine layout moves chunks of " +
                                       std::to_string(smallest) + " bytes; the copy engine is slow below " +
                                       std::to_string(kCopyEngineMinChunk >> 10) + " KiB chunks; the default path "
                                       "(use_ce_transfer_* false) is faster for this layout");
    }
  }
  std::lock_guard<std::mutex> g(engines_mu_);
  const int32_t handle = next_layout_++;
  layouts_[handle] = Layout{engine, id, layout.num_blocks, device >= 0};
  return handle;
}

void ControlPlane::unregister_layout(int32_t handle) {
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [id, t] : tasks_) {
      const bool moving = t.state == TaskStage::kClaimed || t.state == TaskStage::kWaitingForPromotion ||
                          t.state == TaskStage::kCopying;
      if (moving && t.layout == handle) {
        throw TaskError("register_kv_caches: copies are in flight; wait for the tasks to end first");
      }
    }
  }
  std::lock_guard<std::mutex> g(engines_mu_);
  auto it = layouts_.find(handle);
  if (it == layouts_.end()) return;
  it->second.engine->unregister_layout(it->second.id);
  layouts_.erase(it);
}

// ------------------------------------------------------------------ observation

std::vector<std::pair<std::string, int64_t>> ControlPlane::counters() const { return stats_.snapshot(); }

std::vector<std::pair<std::string, Histogram::Snapshot>> ControlPlane::histograms() const {
  return stats_.histograms();
}

std::vector<std::pair<std::string, int64_t>> ControlPlane::gauges() const {
  std::vector<std::pair<std::string, int64_t>> out;
  {
    std::lock_guard<std::mutex> g(mu_);
    out.emplace_back("promotions_in_flight", promoting_);
    out.emplace_back("write_through_backlog_blocks", static_cast<int64_t>(write_backlog_));
    out.emplace_back("tasks_in_table", static_cast<int64_t>(tasks_.size()));
  }
  out.emplace_back("tasks_in_flight", static_cast<int64_t>(tasks_in_flight()));
  out.emplace_back("ssd_read_queue", ssd_reads_ ? static_cast<int64_t>(ssd_reads_->pending()) : 0);
  out.emplace_back("ssd_write_queue", ssd_writes_ ? static_cast<int64_t>(ssd_writes_->pending()) : 0);
  return out;
}

IndexCounts ControlPlane::index_counts() const {
  IndexCounts out;
  out.cpu = cpu_->index().stats();
  if (ssd_) out.ssd = ssd_->index().stats();
  return out;
}

void ControlPlane::check_consistency() const {
  cpu_->index().check_consistency();
  if (ssd_) ssd_->index().check_consistency();
}

std::pair<int64_t, int64_t> ControlPlane::locked_blocks() const {
  return {cpu_->index().stats().num_locked, ssd_ ? ssd_->index().stats().num_locked : 0};
}

}  // namespace flexkv

namespace flexkv {

std::optional<TaskView> ControlPlane::inspect(TaskId id) {
  std::lock_guard<std::mutex> g(mu_);
  Task* t = find(id);
  if (t == nullptr) return std::nullopt;
  return TaskView{stage_name(t->state), kind_name(t->kind), t->blocks, t->host_ids, t->held};
}

std::vector<int32_t> ControlPlane::ssd_slots(const KeyRun& run) {
  if (!ssd_) return {};
  std::vector<int32_t> slots(run.size());
  const size_t got = run_acquire(ssd_->index(), run, 0, run.size(), slots.data());
  slots.resize(got);
  ssd_->index().release(slots.data(), slots.size());
  return slots;
}

uint64_t ControlPlane::ssd_slot_bytes() const { return ssd_ ? ssd_->slot_bytes() : 0; }

std::pair<bool, int32_t> ControlPlane::cpu_block(int32_t id) const {
  return {cpu_->index().is_ready(id), cpu_->index().lock_count(id)};
}

size_t ControlPlane::invalidate(const KeyRun& run, size_t start) {
  const size_t n = run_match(cpu_->index(), run);
  if (n <= start) return 0;
  std::vector<int32_t> ids(n - start);
  const size_t got = run_acquire(cpu_->index(), run, start, n, ids.data());
  ids.resize(got > start ? got - start : 0);
  cpu_->index().set_ready(ids.data(), ids.size(), false);
  cpu_->index().release(ids.data(), ids.size());
  std::vector<BlockKey> keys;
  for (size_t p = start; p < start + ids.size(); ++p) keys.push_back(run.keys[p]);
  events_.removed(Tier::kCpu, keys.data(), keys.size());
  return ids.size();
}

void ControlPlane::pause_completions(bool paused) {
  std::vector<CopyCompletion> held;
  {
    std::lock_guard<std::mutex> g(mu_);
    completions_paused_ = paused;
    if (!paused) held.swap(held_completions_);
  }
  for (const auto& c : held) on_copy_done(c);
}

}  // namespace flexkv
