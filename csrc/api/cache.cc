#include "flexkv/cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "index/block_key.h"
#include "transfer/copy_layout.h"
#include "transfer/gpu_copy_engine.h"
#include "transfer/host_copy_engine.h"
#include "index/radix_index.h"

namespace flexkv {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  return buf;
}

constexpr uint64_t kHugePage = 2ull << 20;

// Anonymous memory for the CPU tier, unmapped on destruction (in 2 MiB huge pages when asked).
class TierMemory {
 public:
  TierMemory(uint64_t bytes, bool huge_pages) : bytes_(huge_pages ? (bytes + kHugePage - 1) / kHugePage * kHugePage : bytes) {
    bytes = bytes_;
    const int flags = MAP_PRIVATE | MAP_ANONYMOUS | (huge_pages ? MAP_HUGETLB : 0);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
      throw std::runtime_error("cannot map " + gib(static_cast<double>(bytes)) + " for the CPU tier" +
                               (huge_pages ? " in huge pages (reserve them in /proc/sys/vm/nr_hugepages or set "
                                             "use_hugepage_cpu_buffer to false)"
                                           : "; lower num_cpu_blocks or cpu_cache_gb"));
    }
    data_ = static_cast<uint8_t*>(p);
  }
  ~TierMemory() { munmap(data_, bytes_); }
  TierMemory(const TierMemory&) = delete;
  TierMemory& operator=(const TierMemory&) = delete;
  uint8_t* data() const { return data_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t bytes_;
};

// A namespace string no two (shape, block size, salt) triples share: every
// part is length-prefixed, so no salt can imitate another part.
std::string namespace_string(const ModelShape& model, int tokens_per_block, std::string_view salt) {
  std::string out;
  for (const std::string& part : {std::string("flexkv-cpp-v1"), model.fingerprint(), std::to_string(tokens_per_block),
                                  std::string(salt)}) {
    out += std::to_string(part.size()) + ":" + part + ";";
  }
  return out;
}

EngineLayout layout_of(const EngineMemory& memory, uint64_t chunk) {
  EngineLayout layout;
  layout.num_blocks = memory.num_blocks;
  for (size_t p = 0; p < memory.planes.size(); ++p) {
    const auto& plane = memory.planes[p];
    const auto base = reinterpret_cast<uint64_t>(plane.base);
    const auto layer = static_cast<int32_t>(p / static_cast<size_t>(memory.kv_factor));
    if (!layout.segments.empty()) {
      CopySegment& last = layout.segments.back();
      // Adjacent in the engine block and in the host block: one segment.
      if (last.engine_block_stride == plane.block_stride_bytes && last.engine_base + last.bytes == base &&
          last.host_offset + last.bytes == p * chunk) {
        last.bytes += chunk;
        last.group = layer;
        continue;
      }
    }
    layout.segments.push_back({base, plane.block_stride_bytes, p * chunk, chunk, layer});
  }
  return layout;
}

void check_memory(const EngineMemory& m, const ModelShape& model, uint64_t chunk) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("register_memory: " + what); };
  if (m.dtype != model.dtype) {
    bad(std::string("dtype is ") + dtype_name(m.dtype) + " but the cache was opened for " + dtype_name(model.dtype) +
        "; open the cache with the engine's KV dtype");
  }
  if (m.num_layers != model.num_layers) {
    bad("num_layers is " + std::to_string(m.num_layers) + " but the model has " + std::to_string(model.num_layers));
  }
  if (m.kv_factor != model.kv_factor()) {
    bad("kv_factor is " + std::to_string(m.kv_factor) + " but the model has " + std::to_string(model.kv_factor()) +
        (model.use_mla ? " (MLA: one latent)" : " (K and V)"));
  }
  if (m.num_blocks < 1) bad("num_blocks is " + std::to_string(m.num_blocks) + "; it must be at least 1");
  const size_t planes = static_cast<size_t>(m.num_layers) * static_cast<size_t>(m.kv_factor);
  if (m.planes.size() != planes) {
    bad(std::to_string(m.planes.size()) + " planes for " + std::to_string(m.num_layers) + " layers x " +
        std::to_string(m.kv_factor) + "; give one plane per layer and k|v");
  }
  for (size_t p = 0; p < planes; ++p) {
    if (m.planes[p].base == nullptr) bad("plane " + std::to_string(p) + " has a null base");
    if (m.planes[p].block_stride_bytes < static_cast<int64_t>(chunk)) {
      bad("plane " + std::to_string(p) + " has a block stride of " + std::to_string(m.planes[p].block_stride_bytes) +
          " bytes, less than one chunk (" + std::to_string(chunk) +
          " bytes = tokens_per_block x kv_heads x head_size x dtype size); check the shape the cache was opened with");
    }
  }
}

void check_engine_blocks(const int64_t* ids, size_t n, int64_t num_blocks, const char* call) {
  for (size_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= num_blocks) {
      throw std::out_of_range(std::string(call) + ": engine_blocks[" + std::to_string(i) + "] = " +
                              std::to_string(ids[i]) + " is outside the engine memory's blocks 0.." +
                              std::to_string(num_blocks - 1));
    }
  }
}

}  // namespace

struct Cache::Impl {
  enum class Kind { kLoad, kStore };
  struct Task {
    Kind kind;
    uint64_t job = 0;
    std::vector<int32_t> host_ids;  // locked until the task finishes
    TaskState state = TaskState::kRunning;
    std::string error;
  };

  Impl(const CacheOptions& o, const ModelShape& m, int64_t blocks)
      : options(o), model(m), tpb(o.tokens_per_block), chunk(m.chunk_bytes(o.tokens_per_block)),
        block(m.block_bytes(o.tokens_per_block)), num_blocks(blocks),
        memory(static_cast<uint64_t>(blocks) * block, o.use_hugepage_cpu_buffer),
        index(static_cast<int32_t>(blocks), o.evict_ratio) {
    host.base = reinterpret_cast<uint64_t>(memory.data());
    host.block_bytes = block;
    host.num_blocks = blocks;
  }

  ~Impl() {
    {
      std::unique_lock<std::mutex> lock(mu);
      stopping = true;
    }
    if (completer.joinable()) completer.join();
    gpu.reset();  // waits for its jobs and unpins the tier before the tier is unmapped
    host_engine.reset();
  }

  std::vector<BlockKey> keys(const int64_t* tokens, size_t n, std::string_view salt) const {
    if (tokens == nullptr && n > 0) throw std::invalid_argument("tokens is null");
    std::vector<BlockKey> out(n / static_cast<size_t>(tpb));
    const BlockKey seed = namespace_key(namespace_string(model, tpb, salt));
    chain_block_keys(seed, tokens, n, static_cast<size_t>(tpb), out.data());
    return out;
  }

  void require_memory(const char* call) const {
    if (!registered) {
      throw std::logic_error(std::string(call) + ": no engine memory yet; call register_memory first");
    }
  }

  // Submits a copy and records its task, under mu so the completer sees the task.
  // The task's host blocks are locked; block i is copied to or from engine_blocks[i].
  TaskId submit(Kind kind, const int64_t* engine_blocks, std::vector<int32_t> host_ids) {
    const std::vector<int64_t> host_blocks(host_ids.begin(), host_ids.end());
    const size_t n_copy = host_ids.size();
    const CopyDirection dir = kind == Kind::kLoad ? CopyDirection::kHostToEngine : CopyDirection::kEngineToHost;
    const bool urgent = kind == Kind::kLoad;
    std::unique_lock<std::mutex> lock(mu);
    uint64_t job;
    try {
      job = gpu ? gpu->submit(dir, layout, host, engine_blocks, host_blocks.data(), n_copy, urgent)
                : host_engine->submit(dir, layout, host, engine_blocks, host_blocks.data(), n_copy, urgent);
    } catch (...) {
      index.release(host_ids.data(), host_ids.size());
      throw;
    }
    const TaskId id = next_task++;
    job_task[job] = id;
    Task& t = tasks[id];
    t.kind = kind;
    t.job = job;
    t.host_ids = std::move(host_ids);
    return id;
  }

  void complete_loop() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        if (stopping && job_task.empty()) return;
      }
      const uint64_t job = gpu ? gpu->wait_any(50000) : host_engine->wait_any(50000);
      if (job == 0) continue;
      const std::string error = gpu ? gpu->take_error(job) : std::string();
      std::unique_lock<std::mutex> lock(mu);
      const auto it = job_task.find(job);
      if (it == job_task.end()) continue;
      Task& t = tasks.at(it->second);
      job_task.erase(it);
      if (t.kind == Kind::kStore && error.empty()) {
        index.commit(t.host_ids.data(), t.host_ids.size());
        stored_blocks += static_cast<int64_t>(t.host_ids.size());
      } else {
        index.release(t.host_ids.data(), t.host_ids.size());
        if (t.kind == Kind::kLoad && error.empty()) loaded_blocks += static_cast<int64_t>(t.host_ids.size());
      }
      t.host_ids.clear();
      t.state = error.empty() ? TaskState::kDone : TaskState::kFailed;
      t.error = error;
      if (!error.empty()) ++failed_tasks;
      done_cv.notify_all();
    }
  }

  TaskState report(TaskId id, std::string* error, std::unique_lock<std::mutex>& lock, int64_t timeout_us) {
    auto it = tasks.find(id);
    if (it == tasks.end()) {
      throw std::out_of_range("unknown task id " + std::to_string(id) +
                              " (never returned by load or store, or already reported finished)");
    }
    if (it->second.state == TaskState::kRunning && timeout_us != 0) {
      auto finished = [&] {
        it = tasks.find(id);
        return it == tasks.end() || it->second.state != TaskState::kRunning;
      };
      if (timeout_us < 0) {
        done_cv.wait(lock, finished);
      } else {
        done_cv.wait_for(lock, std::chrono::microseconds(timeout_us), finished);
      }
      if (it == tasks.end()) {
        throw std::out_of_range("task id " + std::to_string(id) + " was reported finished to another caller");
      }
    }
    const TaskState state = it->second.state;
    if (state != TaskState::kRunning) {
      if (error != nullptr) *error = it->second.error;
      tasks.erase(it);
    }
    return state;
  }

  const CacheOptions options;
  const ModelShape model;
  const int tpb;
  const uint64_t chunk;
  const uint64_t block;
  const int64_t num_blocks;
  TierMemory memory;
  RadixIndex index;
  HostRegion host;

  bool registered = false;
  EngineLayout layout;
  std::unique_ptr<HostCopyEngine> host_engine;
  std::unique_ptr<GpuCopyEngine> gpu;
  std::thread completer;

  mutable std::mutex mu;  // tasks, job_task, stopping, registration
  std::condition_variable done_cv;
  std::unordered_map<TaskId, Task> tasks;
  std::unordered_map<uint64_t, TaskId> job_task;
  TaskId next_task = 1;
  bool stopping = false;

  std::atomic<int64_t> match_calls{0}, matched_tokens{0}, loaded_blocks{0}, stored_blocks{0}, failed_tasks{0};
};

std::unique_ptr<Cache> Cache::open(const CacheOptions& options, const ModelShape& model) {
  options.validate();
  model.validate();
  // What this Cache serves so far: the CPU tier, one tensor-parallel rank's whole blocks.
  const CacheOptions tiers = options.resolved(model);
  if (tiers.enable_ssd || tiers.enable_remote) {
    throw std::invalid_argument(std::string("cache_config.") + (tiers.enable_ssd ? "enable_ssd" : "enable_remote") +
                                ": flexkv::Cache serves the CPU tier only; disable the SSD and remote tiers (and drop "
                                "ssd_cache_gb), or run them through the Python KVManager");
  }
  if (model.tp_size != 1) {
    throw std::invalid_argument("model_config.tp_size: flexkv::Cache serves one rank; open it with tp_size 1 and "
                                "that rank's num_kv_heads");
  }
  const int64_t blocks = options.cpu_blocks_for(model);
  const double bytes = static_cast<double>(blocks) * static_cast<double>(model.block_bytes(options.tokens_per_block));
  const double phys = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  if (phys > 0 && bytes > phys) {
    throw std::invalid_argument("num_cpu_blocks: " + std::to_string(blocks) + " blocks of " +
                                std::to_string(model.block_bytes(options.tokens_per_block)) + " bytes need " +
                                gib(bytes) + ", more than this machine's " + gib(phys) +
                                "; lower num_cpu_blocks or cpu_cache_gb");
  }
  return std::unique_ptr<Cache>(new Cache(std::make_unique<Impl>(options, model, blocks)));
}

Cache::Cache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Cache::~Cache() = default;

const ModelShape& Cache::model() const { return impl_->model; }
int Cache::tokens_per_block() const { return impl_->tpb; }
uint64_t Cache::block_bytes() const { return impl_->block; }

void Cache::register_memory(const EngineMemory& memory) {
  Impl& s = *impl_;
  std::unique_lock<std::mutex> lock(s.mu);
  if (s.registered) throw std::logic_error("register_memory: engine memory is already registered; open a new Cache");
  check_memory(memory, s.model, s.chunk);
  EngineLayout layout = layout_of(memory, s.chunk);
  validate_layout(layout, s.host);
  if (memory.device >= 0) {
    GpuCopyOptions o;
    o.device = memory.device;
    o.path_h2d = s.options.use_ce_transfer_h2d ? GpuCopyPath::kCopyEngine : GpuCopyPath::kKernel;
    o.path_d2h = s.options.use_ce_transfer_d2h ? GpuCopyPath::kCopyEngine : GpuCopyPath::kKernel;
    o.sms_h2d = s.options.transfer_sms_h2d;
    o.sms_d2h = s.options.transfer_sms_d2h;
    auto gpu = std::make_unique<GpuCopyEngine>(o);
    gpu->register_host(s.host.base, s.host.block_bytes * static_cast<uint64_t>(s.host.num_blocks));
    gpu->check_device_layout(layout, s.host);
    s.gpu = std::move(gpu);
  } else {
    s.host_engine = std::make_unique<HostCopyEngine>(s.options.num_copy_threads);
  }
  s.layout = std::move(layout);
  s.registered = true;
  s.completer = std::thread([&s] { s.complete_loop(); });
}

size_t Cache::match(const int64_t* tokens, size_t n, std::string_view salt) {
  Impl& s = *impl_;
  const std::vector<BlockKey> keys = s.keys(tokens, n, salt);
  const size_t hit = s.index.match(keys.data(), keys.size()) * static_cast<size_t>(s.tpb);
  ++s.match_calls;
  s.matched_tokens += static_cast<int64_t>(hit);
  return hit;
}

LoadResult Cache::load(const int64_t* tokens, size_t n, size_t computed_tokens, const int64_t* engine_blocks,
                       size_t n_engine_blocks, std::string_view salt) {
  Impl& s = *impl_;
  s.require_memory("load");
  const auto tpb = static_cast<size_t>(s.tpb);
  if (computed_tokens % tpb != 0) {
    throw std::invalid_argument("load: computed_tokens = " + std::to_string(computed_tokens) +
                                " is not a multiple of tokens_per_block (" + std::to_string(tpb) + ")");
  }
  const std::vector<BlockKey> keys = s.keys(tokens, n, salt);
  const size_t start = computed_tokens / tpb;
  if (start >= keys.size() || n_engine_blocks == 0) return {};
  const size_t limit = std::min(keys.size(), start + n_engine_blocks);
  if (engine_blocks == nullptr) throw std::invalid_argument("load: engine_blocks is null");
  check_engine_blocks(engine_blocks, limit - start, s.layout.num_blocks, "load");
  std::vector<int32_t> ids(limit - start);
  const size_t ready = s.index.acquire(keys.data(), limit, start, ids.data());
  if (ready <= start) return {};
  ids.resize(ready - start);
  const size_t count = ids.size();
  LoadResult r;
  r.task = s.submit(Impl::Kind::kLoad, engine_blocks, std::move(ids));
  r.tokens = count * tpb;
  r.engine_blocks = count;
  return r;
}

StoreResult Cache::store(const int64_t* tokens, size_t n, const int64_t* engine_blocks, size_t n_engine_blocks,
                         std::string_view salt) {
  Impl& s = *impl_;
  s.require_memory("store");
  const std::vector<BlockKey> keys = s.keys(tokens, n, salt);
  if (keys.empty()) return {};
  if (engine_blocks == nullptr || n_engine_blocks < keys.size()) {
    throw std::invalid_argument("store: " + std::to_string(n_engine_blocks) + " engine blocks for " +
                                std::to_string(keys.size()) + " whole blocks of tokens; pass one engine block "
                                "per tokens_per_block tokens, in sequence order");
  }
  check_engine_blocks(engine_blocks, keys.size(), s.layout.num_blocks, "store");
  std::vector<int32_t> ids(keys.size());
  std::vector<uint8_t> fresh(keys.size());
  const size_t handled = s.index.reserve(keys.data(), keys.size(), 0, ids.data(), fresh.data());
  std::vector<int64_t> copy_engine;
  std::vector<int32_t> copy_host;
  for (size_t i = 0; i < handled; ++i) {
    if (fresh[i]) {
      copy_engine.push_back(engine_blocks[i]);
      copy_host.push_back(ids[i]);
    }
  }
  StoreResult r;
  r.cached_blocks = handled - copy_host.size();
  if (copy_host.empty()) return r;
  r.new_blocks = copy_host.size();
  r.task = s.submit(Impl::Kind::kStore, copy_engine.data(), std::move(copy_host));
  return r;
}

TaskState Cache::poll(TaskId task, std::string* error) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  return impl_->report(task, error, lock, 0);
}

TaskState Cache::wait(TaskId task, int64_t timeout_us, std::string* error) {
  std::unique_lock<std::mutex> lock(impl_->mu);
  return impl_->report(task, error, lock, timeout_us);
}

CacheStats Cache::stats() const {
  const Impl& s = *impl_;
  const RadixIndexStats is = s.index.stats();
  CacheStats out;
  out.capacity_blocks = is.capacity;
  out.cached_blocks = is.num_cached;
  out.free_blocks = is.num_free;
  out.locked_blocks = is.num_locked;
  out.evicted_blocks = is.evicted;
  out.match_calls = s.match_calls;
  out.matched_tokens = s.matched_tokens;
  out.loaded_blocks = s.loaded_blocks;
  out.stored_blocks = s.stored_blocks;
  out.failed_tasks = s.failed_tasks;
  std::unique_lock<std::mutex> lock(s.mu);
  out.tasks_in_flight = static_cast<int64_t>(s.job_task.size());
  return out;
}

}  // namespace flexkv
