// Cache: the C++ API, a facade over the control plane (csrc/control/): keys,
// tiers, tasks and flows are the plane's; this file maps the engine's calls
// (token arrays, engine block ids, EngineMemory) onto it.
#include "flexkv/cache.h"

#include <unistd.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "api/cache_attach.h"
#include "control/control_plane.h"

namespace flexkv {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  return buf;
}

ControlPlaneOptions plane_options(const CacheOptions& o, const ModelShape& model) {
  ControlPlaneOptions p;
  p.model_fingerprint = model.fingerprint();
  p.block_bytes = model.block_bytes(o.tokens_per_block);
  p.num_layers = model.num_layers;
  p.tokens_per_block = o.tokens_per_block;
  p.num_cpu_blocks = o.num_cpu_blocks;
  p.evict_ratio = o.evict_ratio;
  p.use_hugepage_cpu_buffer = o.use_hugepage_cpu_buffer;
  p.enable_ssd = o.enable_ssd;
  p.num_ssd_blocks = o.num_ssd_blocks;
  p.ssd_cache_dirs = o.ssd_cache_dirs;
  p.ssd_cache_iouring_entries = static_cast<unsigned>(o.ssd_cache_iouring_entries);
  p.use_ce_transfer_h2d = o.use_ce_transfer_h2d;
  p.use_ce_transfer_d2h = o.use_ce_transfer_d2h;
  p.transfer_sms_h2d = o.transfer_sms_h2d;
  p.transfer_sms_d2h = o.transfer_sms_d2h;
  p.num_copy_threads = o.num_copy_threads;
  return p;
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
  auto bad = [](const std::string& what) { throw LayoutError("register_memory: " + what); };
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

TaskState state_of(const Report& r, std::string* error) {
  switch (r.status) {
    case ReportStatus::kTimeout:
    case ReportStatus::kUnready:
      return TaskState::kRunning;
    case ReportStatus::kNotFound:
      throw std::out_of_range("unknown task id " + std::to_string(r.task) +
                              " (never returned by load or store, or already reported finished)");
    case ReportStatus::kSuccess:
      if (error != nullptr) error->clear();
      return TaskState::kDone;
    default:
      if (error != nullptr) *error = r.error.empty() ? "cancelled" : r.error;
      return TaskState::kFailed;
  }
}

}  // namespace

struct Cache::Impl {
  std::shared_ptr<ControlPlane> plane;
  bool owns_plane = false;
  ModelShape model;
  int tpb = 0;
  uint64_t chunk = 0;
  uint64_t block = 0;
  std::mutex mu;  // registration
  int32_t layout = -1;
  int64_t engine_blocks = 0;

  BlockKey seed(std::string_view salt) const {
    std::vector<std::string> salts;
    if (!salt.empty()) salts.emplace_back(salt);
    return plane->seed("", salts);
  }
  std::shared_ptr<KeyRun> run(const int64_t* tokens, size_t n, std::string_view salt) const {
    if (tokens == nullptr && n > 0) throw std::invalid_argument("tokens is null");
    return plane->token_run(seed(salt), tokens, n);
  }
  void require_memory(const char* call) const {
    if (layout < 0) throw std::logic_error(std::string(call) + ": no engine memory yet; call register_memory first");
  }
};

std::unique_ptr<Cache> Cache::open(const CacheOptions& options, const ModelShape& model) {
  options.validate();
  model.validate();
  const CacheOptions resolved = options.resolved(model);
  const int64_t blocks = resolved.num_cpu_blocks;
  const double bytes = static_cast<double>(blocks) * static_cast<double>(model.block_bytes(options.tokens_per_block));
  const double phys = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGESIZE));
  if (phys > 0 && bytes > phys) {
    throw ConfigError("cache_config.num_cpu_blocks: " + std::to_string(blocks) + " blocks of " +
                          std::to_string(model.block_bytes(options.tokens_per_block)) + " bytes need " + gib(bytes) +
                          ", more than this machine's " + gib(phys) + "; lower num_cpu_blocks or cpu_cache_gb",
                      "cache_config.num_cpu_blocks");
  }
  if (model.tp_size != 1) {
    throw ConfigError("model_config.tp_size = " + std::to_string(model.tp_size) + ": the C++ API serves one "
                      "tensor-parallel rank in this version; use tp_size 1", "model_config.tp_size");
  }
  if (resolved.enable_remote) {
    throw ConfigError("cache_config.enable_remote: the C++ API has no remote tier yet (the Python KVManager has, "
                      "docs/remote.md); set enable_remote to false", "cache_config.enable_remote");
  }
  auto impl = std::make_unique<Impl>();
  impl->plane = ControlPlane::open(plane_options(resolved, model));
  impl->owns_plane = true;
  impl->model = model;
  impl->tpb = options.tokens_per_block;
  impl->chunk = model.chunk_bytes(impl->tpb);
  impl->block = model.block_bytes(impl->tpb);
  return std::unique_ptr<Cache>(new Cache(std::move(impl)));
}

std::unique_ptr<Cache> CacheAccess::attach(std::shared_ptr<ControlPlane> plane, const ModelShape& model) {
  model.validate();
  const int tpb = plane->tokens_per_block();
  if (model.fingerprint() != plane->options().model_fingerprint || model.block_bytes(tpb) != plane->options().block_bytes) {
    throw LayoutError("attach: the model shape " + model.fingerprint() + " is not the one the cache was opened for (" +
                      plane->options().model_fingerprint + ")");
  }
  auto impl = std::make_unique<Cache::Impl>();
  impl->plane = std::move(plane);
  impl->model = model;
  impl->tpb = tpb;
  impl->chunk = model.chunk_bytes(tpb);
  impl->block = model.block_bytes(tpb);
  return std::unique_ptr<Cache>(new Cache(std::move(impl)));
}

Cache::Cache(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Cache::~Cache() {
  if (impl_->owns_plane) {
    impl_->plane->shutdown();
  } else if (impl_->layout >= 0 && !impl_->plane->closed()) {
    try {
      impl_->plane->unregister_layout(impl_->layout);
    } catch (const std::exception&) {  // copies of this facade still in flight: the plane keeps the layout
    }
  }
}

const ModelShape& Cache::model() const { return impl_->model; }
int Cache::tokens_per_block() const { return impl_->tpb; }
uint64_t Cache::block_bytes() const { return impl_->block; }

void Cache::register_memory(const EngineMemory& memory) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> g(s.mu);
  if (s.layout >= 0) throw std::logic_error("register_memory: engine memory is already registered; open a new Cache");
  check_memory(memory, s.model, s.chunk);
  s.layout = s.plane->register_layout(layout_of(memory, s.chunk), memory.device);
  s.engine_blocks = memory.num_blocks;
}

size_t Cache::match(const int64_t* tokens, size_t n, std::string_view salt) {
  const Lookup l = impl_->plane->lookup(*impl_->run(tokens, n, salt));
  return std::max(l.cpu, l.ssd) * static_cast<size_t>(impl_->tpb);
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
  const size_t start = computed_tokens / tpb;
  const size_t whole = n / tpb;
  if (start >= whole || n_engine_blocks == 0) return {};
  const size_t limit = std::min(whole, start + n_engine_blocks);
  if (engine_blocks == nullptr) throw std::invalid_argument("load: engine_blocks is null");
  check_engine_blocks(engine_blocks, limit - start, s.engine_blocks, "load");
  const Match m = s.plane->get_match(s.run(tokens, limit * tpb, salt), start, limit * tpb);
  if (m.blocks.empty()) {
    s.plane->try_wait({m.task});  // ended at its match (maybe after promoting blocks the engine has): forget it
    return {};
  }
  const EngineTargets targets{engine_blocks, m.blocks.size(), false, ""};
  s.plane->launch({m.task}, {targets}, s.layout, /*layerwise=*/false);
  LoadResult r;
  r.task = m.task;
  r.engine_blocks = m.blocks.size();
  r.tokens = r.engine_blocks * tpb;
  return r;
}

StoreResult Cache::store(const int64_t* tokens, size_t n, const int64_t* engine_blocks, size_t n_engine_blocks,
                         std::string_view salt) {
  Impl& s = *impl_;
  s.require_memory("store");
  const size_t whole = n / static_cast<size_t>(s.tpb);
  if (whole == 0) return {};
  if (engine_blocks == nullptr || n_engine_blocks < whole) {
    throw std::invalid_argument("store: " + std::to_string(n_engine_blocks) + " engine blocks for " +
                                std::to_string(whole) + " whole blocks of tokens; pass one engine block "
                                "per tokens_per_block tokens, in sequence order");
  }
  check_engine_blocks(engine_blocks, whole, s.engine_blocks, "store");
  const Match m = s.plane->put_match(s.run(tokens, n, salt), 0, n);
  StoreResult r;
  r.cached_blocks = m.covered - m.blocks.size();
  if (m.blocks.empty()) {
    s.plane->try_wait({m.task});  // nothing to copy: forget it
    return r;
  }
  std::vector<int64_t> sources(m.blocks.size());
  for (size_t k = 0; k < m.blocks.size(); ++k) sources[k] = engine_blocks[m.blocks[k]];
  s.plane->launch({m.task}, {EngineTargets{sources.data(), sources.size(), false, ""}}, s.layout, false);
  r.task = m.task;
  r.new_blocks = m.blocks.size();
  return r;
}

TaskState Cache::poll(TaskId task, std::string* error) {
  return state_of(impl_->plane->try_wait_one(task), error);
}

TaskState Cache::wait(TaskId task, int64_t timeout_us, std::string* error) {
  const double seconds = timeout_us < 0 ? std::numeric_limits<double>::infinity() : static_cast<double>(timeout_us) / 1e6;
  return state_of(impl_->plane->wait({task}, seconds, false).front(), error);
}

bool Cache::flush(int64_t timeout_us) {
  const double seconds = timeout_us < 0 ? std::numeric_limits<double>::infinity() : static_cast<double>(timeout_us) / 1e6;
  return impl_->plane->flush(seconds);
}

CacheStats Cache::stats() const {
  const ControlPlane& p = *impl_->plane;
  const IndexCounts ic = p.index_counts();
  CacheStats out;
  out.capacity_blocks = ic.cpu.capacity;
  out.cached_blocks = ic.cpu.num_cached;
  out.free_blocks = ic.cpu.num_free;
  out.locked_blocks = ic.cpu.num_locked;
  out.evicted_blocks = ic.cpu.evicted;
  for (const auto& [name, value] : p.counters()) {
    if (name == "lookup_requests") out.match_calls = value;
    if (name == "lookup_hit_blocks") out.matched_tokens = value * impl_->tpb;
    if (name == "get_loaded_blocks") out.loaded_blocks = value;
    if (name == "put_stored_blocks") out.stored_blocks = value;
    if (name == "tasks_failed") out.failed_tasks = value;
    if (name == "ssd_hit_blocks") out.ssd_hit_blocks = value;
    if (name == "ssd_written_blocks") out.ssd_written_blocks = value;
    if (name == "ssd_mismatch_blocks") out.ssd_mismatch_blocks = value;
  }
  out.tasks_in_flight = static_cast<int64_t>(p.tasks_in_flight());
  if (ic.ssd) {
    out.ssd_capacity_blocks = ic.ssd->capacity;
    out.ssd_cached_blocks = ic.ssd->num_cached;
  }
  return out;
}

}  // namespace flexkv
