#include "flexkv/cache_options.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "json_value.h"

namespace flexkv {

using detail::JsonValue;

namespace {

struct DTypeName {
  const char* name;
  DType dtype;
};

constexpr DTypeName kDTypeNames[] = {
    {"bfloat16", DType::kBFloat16}, {"bf16", DType::kBFloat16},         {"float16", DType::kFloat16},
    {"fp16", DType::kFloat16},      {"half", DType::kFloat16},          {"float32", DType::kFloat32},
    {"fp32", DType::kFloat32},      {"float", DType::kFloat32},         {"float8_e4m3fn", DType::kFloat8E4M3},
    {"fp8", DType::kFloat8E4M3},    {"fp8_e4m3", DType::kFloat8E4M3},   {"float8_e5m2", DType::kFloat8E5M2},
    {"fp8_e5m2", DType::kFloat8E5M2}, {"int8", DType::kInt8},           {"uint8", DType::kUInt8},
};

// Keys of the config file, as the Python reader knows them. The C++ API reads
// the CPU-tier ones and refuses enabled tiers it does not serve.
const std::vector<std::string> kTopKeys = {"server_recv_port", "cache_config", "model_config", "enable_flexkv",
                                           "num_log_interval_requests", "cpu_cache_gb", "ssd_cache_gb",
                                           "ssd_cache_dir"};
const std::vector<std::string> kCacheKeys = {
    "tokens_per_block", "enable_cpu", "enable_ssd", "enable_remote", "num_cpu_blocks", "num_ssd_blocks",
    "num_remote_blocks", "ssd_cache_dir", "remote_cache_path", "remote_config_custom", "evict_ratio",
    "use_ce_transfer_h2d", "use_ce_transfer_d2h", "transfer_sms_h2d", "transfer_sms_d2h",
    "ssd_cache_iouring_entries", "ssd_cache_iouring_flags", "use_hugepage_cpu_buffer", "eviction_policy",
    "cpu_cache_gb", "ssd_cache_gb"};
const std::vector<std::string> kModelKeys = {"num_layers", "num_kv_heads", "head_size", "use_mla",
                                             "dtype",      "tp_size",      "dp_size"};

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// Builds "<where>: <key>: <what>" errors.
class Reader {
 public:
  explicit Reader(std::string where) : where_(std::move(where)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw std::invalid_argument(where_ + ": " + key + ": " + what);
  }

  void check_keys(const JsonValue& obj, const std::string& prefix, const std::vector<std::string>& known) const {
    for (const auto& [name, value] : obj.members) {
      if (std::find(known.begin(), known.end(), name) != known.end()) continue;
      std::string best;
      size_t best_d = 4;
      for (const auto& k : known) {
        const size_t d = edit_distance(name, k);
        if (d < best_d) {
          best_d = d;
          best = k;
        }
      }
      std::string list;
      for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
      fail(prefix + name, "unknown key" + (best.empty() ? "" : "; did you mean \"" + best + "\"?") +
                              " Known keys: " + list);
    }
  }

  bool boolean(const JsonValue& v, const std::string& key) const {
    if (v.kind != JsonValue::Kind::kBool) fail(key, "expected true or false, got " + v.describe());
    return v.boolean;
  }

  int64_t integer(const JsonValue& v, const std::string& key, int64_t lo, int64_t hi) const {
    if (v.kind != JsonValue::Kind::kNumber || !v.integral) fail(key, "expected a whole number, got " + v.describe());
    if (v.integer < lo || v.integer > hi) {
      fail(key, v.describe() + " is out of range; use a value from " + std::to_string(lo) + " to " +
                    std::to_string(hi));
    }
    return v.integer;
  }

  double number(const JsonValue& v, const std::string& key) const {
    if (v.kind != JsonValue::Kind::kNumber) fail(key, "expected a number, got " + v.describe());
    return v.number;
  }

  std::string string(const JsonValue& v, const std::string& key) const {
    if (v.kind != JsonValue::Kind::kString) fail(key, "expected a string, got " + v.describe());
    return v.text;
  }

  const JsonValue& object(const JsonValue& v, const std::string& key) const {
    if (v.kind != JsonValue::Kind::kObject) fail(key, "expected an object {...}, got " + v.describe());
    return v;
  }

 private:
  std::string where_;
};

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

void read_cache(const Reader& r, const JsonValue& cache, CacheOptions& out) {
  const std::string p = "cache_config.";
  r.check_keys(cache, p, kCacheKeys);
  for (const auto& [name, v] : cache.members) {
    const std::string key = p + name;
    if (name == "tokens_per_block") {
      out.tokens_per_block = static_cast<int>(r.integer(v, key, 1, 65536));
    } else if (name == "enable_cpu") {
      if (!r.boolean(v, key)) r.fail(key, "the CPU tier cannot be disabled; set enable_cpu to true");
    } else if (name == "enable_ssd") {
      if (r.boolean(v, key)) {
        r.fail(key, "the C++ API (flexkv::Cache) serves the CPU tier only; set enable_ssd to false, or run "
                    "the SSD tier through the Python KVManager");
      }
    } else if (name == "enable_remote") {
      if (r.boolean(v, key)) {
        r.fail(key, "the C++ API (flexkv::Cache) serves the CPU tier only; set enable_remote to false");
      }
    } else if (name == "num_cpu_blocks") {
      out.num_cpu_blocks = r.integer(v, key, 1, kIntMax);
    } else if (name == "cpu_cache_gb") {
      const double gb = r.number(v, key);
      if (!(gb > 0)) r.fail(key, v.describe() + " must be above 0 (GiB of CPU memory)");
      out.cpu_cache_gb = gb;
    } else if (name == "ssd_cache_gb") {
      if (r.number(v, key) > 0) {
        r.fail(key, "the C++ API (flexkv::Cache) serves the CPU tier only; drop ssd_cache_gb or set it to 0");
      }
    } else if (name == "evict_ratio") {
      out.evict_ratio = r.number(v, key);
    } else if (name == "use_ce_transfer_h2d") {
      out.use_ce_transfer_h2d = r.boolean(v, key);
    } else if (name == "use_ce_transfer_d2h") {
      out.use_ce_transfer_d2h = r.boolean(v, key);
    } else if (name == "transfer_sms_h2d") {
      out.transfer_sms_h2d = static_cast<int>(r.integer(v, key, 1, 1024));
    } else if (name == "transfer_sms_d2h") {
      out.transfer_sms_d2h = static_cast<int>(r.integer(v, key, 1, 1024));
    } else if (name == "use_hugepage_cpu_buffer") {
      out.use_hugepage_cpu_buffer = r.boolean(v, key);
    } else if (name == "eviction_policy") {
      if (r.string(v, key) != "lru") r.fail(key, v.describe() + " is not a policy; the one policy is \"lru\"");
    }
    // The remaining keys size or tune tiers that stay disabled here.
  }
  if (cache.find("num_cpu_blocks") && cache.find("cpu_cache_gb")) {
    r.fail(p + "cpu_cache_gb", "set either num_cpu_blocks or cpu_cache_gb, not both");
  }
}

ModelShape read_model(const Reader& r, const JsonValue& model) {
  const std::string p = "model_config.";
  r.check_keys(model, p, kModelKeys);
  ModelShape m;
  for (const auto& [name, v] : model.members) {
    const std::string key = p + name;
    if (name == "num_layers") {
      m.num_layers = static_cast<int>(r.integer(v, key, 1, 4096));
    } else if (name == "num_kv_heads") {
      m.num_kv_heads = static_cast<int>(r.integer(v, key, 1, 4096));
    } else if (name == "head_size") {
      m.head_size = static_cast<int>(r.integer(v, key, 1, 65536));
    } else if (name == "use_mla") {
      m.use_mla = r.boolean(v, key);
    } else if (name == "dtype") {
      try {
        m.dtype = parse_dtype(r.string(v, key));
      } catch (const std::invalid_argument& e) {
        r.fail(key, e.what());
      }
    } else if (name == "tp_size" || name == "dp_size") {
      if (r.integer(v, key, 1, 4096) != 1) {
        r.fail(key, "the C++ API opens one cache per engine rank; give each rank's own shape "
                    "(num_kv_heads on that rank) and leave " + name + " at 1");
      }
    }
  }
  for (const char* required : {"num_layers", "num_kv_heads", "head_size"}) {
    if (!model.find(required)) r.fail(p + required, "missing; model_config needs num_layers, num_kv_heads and head_size");
  }
  return m;
}

}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 1;
  }
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat8E4M3: return "float8_e4m3fn";
    case DType::kFloat8E5M2: return "float8_e5m2";
    case DType::kInt8: return "int8";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

DType parse_dtype(std::string_view name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower.rfind("torch.", 0) == 0) lower = lower.substr(6);
  for (const auto& d : kDTypeNames) {
    if (lower == d.name) return d.dtype;
  }
  std::string list;
  for (const auto& d : kDTypeNames) list += (list.empty() ? "" : ", ") + std::string(d.name);
  throw std::invalid_argument("unknown dtype \"" + std::string(name) + "\"; use one of " + list);
}

uint64_t ModelShape::chunk_bytes(int tokens_per_block) const {
  return static_cast<uint64_t>(tokens_per_block) * static_cast<uint64_t>(num_kv_heads) *
         static_cast<uint64_t>(head_size) * dtype_size(dtype);
}

uint64_t ModelShape::block_bytes(int tokens_per_block) const {
  return chunk_bytes(tokens_per_block) * static_cast<uint64_t>(num_layers) * static_cast<uint64_t>(kv_factor());
}

void ModelShape::validate() const {
  auto need = [](int v, const char* name) {
    if (v < 1) {
      throw std::invalid_argument(std::string("ModelShape.") + name + " is " + std::to_string(v) +
                                  "; it must be at least 1");
    }
  };
  need(num_layers, "num_layers");
  need(num_kv_heads, "num_kv_heads");
  need(head_size, "head_size");
}

std::string ModelShape::fingerprint() const {
  std::ostringstream s;
  s << "layers=" << num_layers << ",kv_heads=" << num_kv_heads << ",head_size=" << head_size
    << ",dtype=" << dtype_name(dtype) << ",mla=" << (use_mla ? 1 : 0);
  return s.str();
}

void CacheOptions::validate() const {
  auto bad = [](const std::string& key, const std::string& what) {
    throw std::invalid_argument("CacheOptions." + key + ": " + what);
  };
  if (tokens_per_block < 1) bad("tokens_per_block", "must be at least 1");
  if (num_cpu_blocks < 0 || num_cpu_blocks > kIntMax) bad("num_cpu_blocks", "must be 1 to 2^31-1");
  if (num_cpu_blocks > 0 && cpu_cache_gb) bad("cpu_cache_gb", "set either num_cpu_blocks or cpu_cache_gb, not both");
  if (num_cpu_blocks == 0 && !cpu_cache_gb) bad("num_cpu_blocks", "the CPU tier needs a size: set num_cpu_blocks or cpu_cache_gb");
  if (cpu_cache_gb && !(*cpu_cache_gb > 0)) bad("cpu_cache_gb", "must be above 0");
  if (!(evict_ratio >= 0.0 && evict_ratio < 1.0)) bad("evict_ratio", "must be at least 0 and below 1 (0.05 frees 5% extra)");
  if (transfer_sms_h2d < 1 || transfer_sms_d2h < 1) bad("transfer_sms_h2d", "must be at least 1");
  if (num_copy_threads < 1 || num_copy_threads > 256) bad("num_copy_threads", "must be 1 to 256");
  if (model) model->validate();
}

int64_t CacheOptions::cpu_blocks_for(const ModelShape& model) const {
  if (num_cpu_blocks > 0) return num_cpu_blocks;
  const uint64_t block = model.block_bytes(tokens_per_block);
  const double gib = cpu_cache_gb.value_or(0.0);
  const auto blocks = static_cast<int64_t>(gib * 1024.0 * 1024.0 * 1024.0 / static_cast<double>(block));
  if (blocks < 1) {
    throw std::invalid_argument("cpu_cache_gb: " + std::to_string(gib) + " GiB holds no block of " +
                                std::to_string(block) + " bytes for this model; raise cpu_cache_gb");
  }
  return std::min<int64_t>(blocks, kIntMax);
}

CacheOptions CacheOptions::from_json(std::string_view json, const std::string& where) {
  const JsonValue root = detail::parse_json(json, where);
  const Reader r(where);
  if (root.kind != JsonValue::Kind::kObject) r.fail("(top level)", "a config is a JSON object {...}");
  r.check_keys(root, "", kTopKeys);
  CacheOptions out;
  if (const JsonValue* cache = root.find("cache_config")) read_cache(r, r.object(*cache, "cache_config"), out);
  if (const JsonValue* gb = root.find("cpu_cache_gb")) {
    if (out.num_cpu_blocks > 0 || out.cpu_cache_gb) {
      r.fail("cpu_cache_gb", "the CPU tier is sized twice; keep one of cpu_cache_gb, cache_config.num_cpu_blocks "
                             "and cache_config.cpu_cache_gb");
    }
    const double v = r.number(*gb, "cpu_cache_gb");
    if (!(v > 0)) r.fail("cpu_cache_gb", gb->describe() + " must be above 0 (GiB of CPU memory)");
    out.cpu_cache_gb = v;
  }
  if (const JsonValue* gb = root.find("ssd_cache_gb"); gb && r.number(*gb, "ssd_cache_gb") > 0) {
    r.fail("ssd_cache_gb", "the C++ API (flexkv::Cache) serves the CPU tier only; drop ssd_cache_gb or set it to 0");
  }
  if (const JsonValue* model = root.find("model_config")) out.model = read_model(r, r.object(*model, "model_config"));
  if (out.num_cpu_blocks == 0 && !out.cpu_cache_gb) {
    r.fail("cache_config.num_cpu_blocks", "the CPU tier needs a size: set cache_config.num_cpu_blocks or cpu_cache_gb");
  }
  if (!(out.evict_ratio >= 0.0 && out.evict_ratio < 1.0)) {
    r.fail("cache_config.evict_ratio", std::to_string(out.evict_ratio) + " must be at least 0 and below 1");
  }
  return out;
}

CacheOptions CacheOptions::from_file(const std::string& path) {
  std::string file = path;
  std::string via;
  if (file.empty()) {
    const char* env = std::getenv("FLEXKV_CONFIG_PATH");
    if (env == nullptr || *env == '\0') {
      throw std::invalid_argument("no config file given and FLEXKV_CONFIG_PATH is not set; pass a path or export "
                                  "FLEXKV_CONFIG_PATH=/path/to/flexkv_config.json");
    }
    file = env;
    via = " (from FLEXKV_CONFIG_PATH)";
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw std::invalid_argument("config file '" + file + "'" + via + " cannot be read; check the path");
  }
  std::ostringstream text;
  text << in.rdbuf();
  return from_json(text.str(), file);
}

}  // namespace flexkv
