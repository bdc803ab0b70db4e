// ControlPlane: block images for tiers kept outside the core (the remote
// tier). A block leaves as the SSD header (ssd_block_header.h) followed by its
// payload, and comes back into a put task's CPU block only if every header
// field, its token ids and the payload checksum match what the task expects.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "control/control_plane.h"
#include "control/tier_flows.h"
#include "flexkv/errors.h"
#include "transfer/ssd_block_header.h"

namespace flexkv {
namespace {

std::string object_fingerprint_text(const ControlPlaneOptions& o) {
  return "flexkv-object-v1;" + o.model_fingerprint + ";tpb=" + std::to_string(o.tokens_per_block) +
         ";bytes=" + std::to_string(o.block_bytes);
}

}  // namespace

uint64_t ControlPlane::object_fingerprint() const {
  const std::string text = object_fingerprint_text(options_);
  return ssd::hash64(text.data(), text.size());
}

uint64_t ControlPlane::object_bytes() const {
  return ssd::header_bytes(static_cast<uint32_t>(options_.tokens_per_block)) + options_.block_bytes;
}

size_t ControlPlane::export_blocks(const KeyRun& run, size_t start, size_t stop, std::vector<uint8_t>* out) {
  {
    std::lock_guard<std::mutex> g(mu_);
    require_open("export_blocks");
  }
  stop = std::min(stop, run.size());
  out->clear();
  if (start >= stop) return 0;
  std::vector<int32_t> ids(stop - start);
  const size_t got = run_acquire(cpu_->index(), run, start, stop, ids.data());
  const size_t n = got > start ? got - start : 0;
  const auto tpb = static_cast<uint32_t>(options_.tokens_per_block);
  const uint64_t head = ssd::header_bytes(tpb), each = object_bytes();
  const uint64_t fp = object_fingerprint();
  const std::vector<int64_t> zeros(tpb, 0);
  try {
    out->resize(n * each);
    for (size_t k = 0; k < n; ++k) {
      const size_t p = start + k;
      uint8_t* dst = out->data() + k * each;
      const uint8_t* payload = cpu_->block(ids[k]);
      std::memcpy(dst + head, payload, options_.block_bytes);
      ssd::HeaderFields f;
      f.fingerprint_hash = fp;
      f.key = run.keys[p];
      f.parent = run.parent_of(p);
      f.position = run.position_of(p);
      f.tokens_per_block = tpb;
      f.block_bytes = options_.block_bytes;
      f.payload_checksum = ssd::hash64(dst + head, options_.block_bytes);
      const int64_t* tokens = run.tokens_of(p);
      ssd::encode_header(dst, f, tokens != nullptr ? tokens : zeros.data());
    }
  } catch (...) {
    cpu_->index().release(ids.data(), n);
    throw;
  }
  cpu_->index().release(ids.data(), n);
  return n;
}

std::vector<uint8_t> ControlPlane::import_blocks(TaskId id, const uint8_t* const* objects, const size_t* sizes,
                                                 size_t n) {
  std::shared_ptr<const KeyRun> run;
  std::vector<int64_t> blocks;
  std::vector<int32_t> host_ids;
  {
    std::lock_guard<std::mutex> g(mu_);
    Task* t = find(id);
    if (t == nullptr) throw TaskError("import_blocks: unknown task " + std::to_string(id));
    if (t->kind != TaskKind::kPut || t->state != TaskStage::kExternal) {
      throw TaskError("import_blocks: task " + std::to_string(id) + " is not a put taken with take() (it is " +
                      stage_name(t->state) + ")");
    }
    if (n != t->blocks.size()) {
      throw TaskError("import_blocks: task " + std::to_string(id) + " stores " + std::to_string(t->blocks.size()) +
                      " blocks, got " + std::to_string(n) + " objects");
    }
    run = t->run;
    blocks = t->blocks;
    host_ids = t->host_ids;
  }
  const auto tpb = static_cast<uint32_t>(options_.tokens_per_block);
  const uint64_t head = ssd::header_bytes(tpb), each = object_bytes();
  const uint64_t fp = object_fingerprint();
  std::vector<uint8_t> ok(n, 0);
  for (size_t k = 0; k < n; ++k) {
    if (objects[k] == nullptr || sizes[k] != each) continue;
    ssd::HeaderFields f;
    const int64_t* tokens = nullptr;
    if (!ssd::decode_header(objects[k], tpb, &f, &tokens)) continue;
    const auto p = static_cast<size_t>(blocks[k]);
    if (f.fingerprint_hash != fp || f.block_bytes != options_.block_bytes || !(f.key == run->keys[p]) ||
        !(f.parent == run->parent_of(p)) || f.position != run->position_of(p)) {
      continue;
    }
    const int64_t* want = run->tokens_of(p);
    if (want != nullptr && std::memcmp(want, tokens, 8 * static_cast<size_t>(tpb)) != 0) continue;
    if (ssd::hash64(objects[k] + head, options_.block_bytes) != f.payload_checksum) continue;
    std::memcpy(cpu_->block(host_ids[k]), objects[k] + head, options_.block_bytes);
    ok[k] = 1;
  }
  return ok;
}

void ControlPlane::add_counters(const std::vector<std::pair<std::string, int64_t>>& values) {
  for (const auto& [name, value] : values) {
    if (!stats_.add_named(name, value)) throw std::invalid_argument("add_counters: no counter named '" + name + "'");
  }
}

void ControlPlane::observe_latency(const std::string& name, double seconds) {
  if (!stats_.observe_named(name, seconds)) throw std::invalid_argument("observe_latency: no timer named '" + name + "'");
}

}  // namespace flexkv
