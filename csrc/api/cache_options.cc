#include "flexkv/cache_options.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <stdexcept>

#include "config_reader.h"
#include "config_schema.h"
#include "option_fields.h"

namespace flexkv {

using detail::check_range;
using detail::config_schema;
using detail::ConfigKeyError;
using detail::Json;

namespace {

constexpr DType kDTypes[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat8E4M3,
                             DType::kFloat8E5M2, DType::kInt8,    DType::kUInt8};

constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();

// Python's float floor division `x // y` (CPython's float_floor_div), so that a
// GiB size gives the same block count in both languages.
double py_floordiv(double x, double y) {
  double mod = std::fmod(x, y);
  double div = (x - mod) / y;
  if (mod != 0.0 && ((y < 0) != (mod < 0))) {
    mod += y;
    div -= 1.0;
  }
  if (div == 0.0) return std::copysign(0.0, x / y);
  double floordiv = std::floor(div);
  if (div - floordiv > 0.5) floordiv += 1.0;
  return floordiv;
}

// max(1, int(gb * 2**30 // block_bytes)), as Python's CacheConfig.resolved.
int64_t blocks_in(double gb, uint64_t block_bytes) {
  const double n = py_floordiv(gb * 1073741824.0, static_cast<double>(block_bytes));
  if (!(n < 9.2e18)) return std::numeric_limits<int64_t>::max();
  return std::max<int64_t>(1, static_cast<int64_t>(n));
}

bool blank(const std::string& s) { return detail::trim(s).empty(); }

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
  std::string key = detail::lower(detail::trim(name));
  if (key.rfind("torch.", 0) == 0) key = key.substr(6);
  const auto& names = config_schema().dtype_names;  // accepted name -> canonical name
  for (const auto& [accepted, canonical] : names) {
    if (key != accepted) continue;
    for (DType d : kDTypes) {
      if (canonical == dtype_name(d)) return d;
    }
    throw std::invalid_argument("dtype \"" + canonical + "\" has no C++ DType; add it to flexkv::DType");
  }
  std::vector<std::string> sorted;
  for (const auto& n : names) sorted.push_back(n.first);
  std::sort(sorted.begin(), sorted.end());
  throw std::invalid_argument("\"" + std::string(name) + "\" is not a supported KV cache dtype; use one of: " +
                              detail::join(sorted, ", "));
}

uint64_t ModelShape::chunk_bytes(int tokens_per_block) const {
  return static_cast<uint64_t>(tokens_per_block) * static_cast<uint64_t>(num_kv_heads) *
         static_cast<uint64_t>(head_size) * dtype_size(dtype);
}

uint64_t ModelShape::block_bytes(int tokens_per_block) const {
  return chunk_bytes(tokens_per_block) * static_cast<uint64_t>(num_layers) * static_cast<uint64_t>(kv_factor());
}

void ModelShape::validate() const {
  const std::pair<const char*, int> fields[] = {
      {"num_layers", num_layers}, {"num_kv_heads", num_kv_heads}, {"head_size", head_size}, {"tp_size", tp_size}};
  for (const auto& [name, value] : fields) check_range(config_schema().at("model_config", name), Json(value));
}

std::string ModelShape::fingerprint() const {
  return std::string("dtype=") + dtype_name(dtype) + ";kv_heads=" + std::to_string(num_kv_heads) +
         ";head_size=" + std::to_string(head_size) + ";layers=" + std::to_string(num_layers) +
         ";mla=" + (use_mla ? "1" : "0") + ";tp=" + std::to_string(tp_size);
}

CacheOptions::CacheOptions() {
  for (const detail::OptionField& f : detail::option_fields()) {
    const detail::KeySpec& spec = config_schema().at("cache_config", f.key);
    f.set(*this, spec.default_value, spec);
  }
}

void CacheOptions::validate() const {
  const std::string k = "cache_config.";
  if (!enable_cpu) {
    throw ConfigKeyError(k + "enable_cpu", "false is not supported: FlexKV always stages blocks through CPU memory; "
                                           "set enable_cpu to true (size it with num_cpu_blocks or cpu_cache_gb)");
  }
  if (!remote_config_custom.empty() && !Json::parse(remote_config_custom, nullptr, false).is_object()) {
    throw ConfigKeyError(k + "remote_config_custom", "is not the text of a JSON object; give e.g. "
                                                     "{\"endpoint\": \"s3.amazonaws.com\"}, or leave it empty");
  }
  for (const detail::OptionField& f : detail::option_fields()) {
    const detail::KeySpec& spec = config_schema().at("cache_config", f.key);
    // A tier's block count is checked only when it sizes an enabled tier.
    const std::string_view name = f.key;
    if (name == "num_cpu_blocks" && cpu_cache_gb) continue;
    if (name == "num_ssd_blocks" && !(enable_ssd && !ssd_cache_gb)) continue;
    if (spec.has_range() || !spec.choices.empty()) check_range(spec, f.get(*this));
  }
  if (!num_remote_blocks && enable_remote) {
    throw ConfigKeyError(k + "num_remote_blocks", "required when enable_remote is true: give the remote tier's size "
                                                  "in blocks, e.g. 20000000");
  }
  if (ssd_cache_gb && *ssd_cache_gb == 0 && enable_ssd) {
    throw ConfigKeyError(k + "ssd_cache_gb", "0 disables the SSD tier but enable_ssd is true; give ssd_cache_gb > 0 "
                                             "or set enable_ssd to false");
  }
  const CacheOptions defaults;
  if (cpu_cache_gb && num_cpu_blocks != defaults.num_cpu_blocks) {
    throw ConfigKeyError(k + "num_cpu_blocks", detail::both_sizes_detail(detail::kSizePairs[0]));
  }
  if (ssd_cache_gb && num_ssd_blocks != defaults.num_ssd_blocks) {
    throw ConfigKeyError(k + "num_ssd_blocks", detail::both_sizes_detail(detail::kSizePairs[1]));
  }
  if (std::any_of(ssd_cache_dirs.begin(), ssd_cache_dirs.end(), blank)) {
    throw ConfigKeyError(k + "ssd_cache_dir", "contains an empty path; give directories such as \"/data/flexkv_ssd/\" "
                                              "(several separated by ';')");
  }
  const bool ssd_on = enable_ssd || (ssd_cache_gb && *ssd_cache_gb > 0);
  if (ssd_on && ssd_cache_dirs.empty()) {
    throw ConfigKeyError(k + "ssd_cache_dir", "required when the SSD tier is enabled: give a directory such as "
                                              "\"/data/flexkv_ssd/\" (several separated by ';'), or disable the SSD tier");
  }
  if (num_copy_threads < 1 || num_copy_threads > 256) {
    throw ConfigKeyError("num_copy_threads", std::to_string(num_copy_threads) + " is out of range: expected an "
                                             "integer in [1, 256] (threads of the host copy engine)");
  }
  if (model) model->validate();
}

CacheOptions CacheOptions::resolved(const ModelShape& model_shape) const {
  CacheOptions out = *this;
  if (!cpu_cache_gb && !ssd_cache_gb) return out;
  model_shape.validate();
  const uint64_t block = model_shape.block_bytes(tokens_per_block);
  if (block == 0) {
    throw ConfigKeyError("cache_config.tokens_per_block", std::to_string(tokens_per_block) +
                                                              " gives empty blocks; expected an integer >= 1");
  }
  if (cpu_cache_gb) {
    out.num_cpu_blocks = blocks_in(*cpu_cache_gb, block);
    out.cpu_cache_gb.reset();
  }
  if (ssd_cache_gb) {
    if (*ssd_cache_gb > 0) {
      out.num_ssd_blocks = blocks_in(*ssd_cache_gb, block);
      out.enable_ssd = true;
    } else {
      out.enable_ssd = false;
    }
    out.ssd_cache_gb.reset();
  }
  return out;
}

int64_t CacheOptions::cpu_blocks_for(const ModelShape& model_shape) const {
  const int64_t blocks = resolved(model_shape).num_cpu_blocks;
  if (blocks > kMaxBlocks) {
    throw ConfigKeyError(cpu_cache_gb ? "cache_config.cpu_cache_gb" : "cache_config.num_cpu_blocks",
                         std::to_string(blocks) + " blocks are more than the 2147483647 a tier can index; "
                                                  "size the CPU tier smaller");
  }
  return blocks;
}

CacheOptions CacheOptions::from_json(std::string_view json, const std::string& where) {
  return detail::read_config(json, where, nullptr).options;
}

CacheOptions CacheOptions::from_file(const std::string& path) {
  detail::ConfigRead read = detail::read_config_file(path, detail::process_env());
  for (const auto& warning : read.warnings) std::fprintf(stderr, "flexkv: %s\n", warning.c_str());
  return std::move(read.options);
}

}  // namespace flexkv
