#include "option_fields.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <string>

namespace flexkv::detail {

namespace {

template <class Int>
Int to_int(const Json& v, const KeySpec& spec) {
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<Int>::max())
                        : v.get<int64_t>() >= std::numeric_limits<Int>::min() &&
                              v.get<int64_t>() <= std::numeric_limits<Int>::max();
  if (!fits) {
    throw ConfigKeyError(spec.key(), v.dump() + " does not fit the C++ API's " + std::to_string(sizeof(Int) * 8) +
                                         "-bit field; use at most " +
                                         std::to_string(std::numeric_limits<Int>::max()));
  }
  return v.is_number_unsigned() ? static_cast<Int>(v.get<uint64_t>()) : static_cast<Int>(v.get<int64_t>());
}

void assign(int& out, const Json& v, const KeySpec& s) { out = to_int<int>(v, s); }
void assign(int64_t& out, const Json& v, const KeySpec& s) { out = to_int<int64_t>(v, s); }
void assign(double& out, const Json& v, const KeySpec&) { out = v.get<double>(); }
void assign(bool& out, const Json& v, const KeySpec&) { out = v.get<bool>(); }
void assign(std::string& out, const Json& v, const KeySpec& s) {
  // An object key keeps the object's JSON text ("" for null); a string key the string.
  if (s.type == KeyType::kObject) {
    out = v.is_null() ? std::string() : v.dump();
  } else {
    out = v.get<std::string>();
  }
}
void assign(std::vector<std::string>& out, const Json& v, const KeySpec&) { out = split_dirs(v); }
template <class T>
void assign(std::optional<T>& out, const Json& v, const KeySpec& s) {
  if (v.is_null()) {
    out.reset();
    return;
  }
  T value{};
  assign(value, v, s);
  out = value;
}

Json value_of(int x) { return x; }
Json value_of(int64_t x) { return x; }
Json value_of(double x) { return x; }
Json value_of(bool x) { return x; }
Json value_of(const std::string& x) { return x; }
Json value_of(const std::vector<std::string>& x) { return x.empty() ? Json() : Json(x); }
template <class T>
Json value_of(const std::optional<T>& x) {
  return x ? value_of(*x) : Json();
}

template <auto Member>
OptionField field(const char* key) {
  return {key, [](CacheOptions& o, const Json& v, const KeySpec& s) { assign(o.*Member, v, s); },
          [](const CacheOptions& o) { return value_of(o.*Member); }};
}

std::vector<OptionField> make_fields() {
  std::vector<OptionField> fields = {
      field<&CacheOptions::tokens_per_block>("tokens_per_block"),
      field<&CacheOptions::enable_cpu>("enable_cpu"),
      field<&CacheOptions::enable_ssd>("enable_ssd"),
      field<&CacheOptions::enable_remote>("enable_remote"),
      field<&CacheOptions::num_cpu_blocks>("num_cpu_blocks"),
      field<&CacheOptions::num_ssd_blocks>("num_ssd_blocks"),
      field<&CacheOptions::num_remote_blocks>("num_remote_blocks"),
      field<&CacheOptions::ssd_cache_dirs>("ssd_cache_dir"),
      field<&CacheOptions::remote_cache_path>("remote_cache_path"),
      // The object's text; the getter gives the object back.
      {"remote_config_custom",
       [](CacheOptions& o, const Json& v, const KeySpec& s) { assign(o.remote_config_custom, v, s); },
       [](const CacheOptions& o) { return o.remote_config_custom.empty() ? Json() : Json::parse(o.remote_config_custom); }},
      field<&CacheOptions::evict_ratio>("evict_ratio"),
      field<&CacheOptions::use_ce_transfer_h2d>("use_ce_transfer_h2d"),
      field<&CacheOptions::use_ce_transfer_d2h>("use_ce_transfer_d2h"),
      field<&CacheOptions::transfer_sms_h2d>("transfer_sms_h2d"),
      field<&CacheOptions::transfer_sms_d2h>("transfer_sms_d2h"),
      field<&CacheOptions::ssd_cache_iouring_entries>("ssd_cache_iouring_entries"),
      field<&CacheOptions::ssd_cache_iouring_flags>("ssd_cache_iouring_flags"),
      field<&CacheOptions::use_hugepage_cpu_buffer>("use_hugepage_cpu_buffer"),
      field<&CacheOptions::eviction_policy>("eviction_policy"),
      field<&CacheOptions::cpu_cache_gb>("cpu_cache_gb"),
      field<&CacheOptions::ssd_cache_gb>("ssd_cache_gb"),
  };
  const ConfigSchema& schema = config_schema();
  for (const OptionField& f : fields) schema.at("cache_config", f.key);  // every field is a config key
  // File order, so validate() reports problems in the order Python's CacheConfig.validate does.
  auto position = [&schema](const OptionField& f) {
    const auto& keys = schema.cache_config;
    return std::find_if(keys.begin(), keys.end(), [&f](const KeySpec& s) { return s.name == f.key; }) - keys.begin();
  };
  std::sort(fields.begin(), fields.end(), [&](const OptionField& a, const OptionField& b) {
    return position(a) < position(b);
  });
  return fields;
}

}  // namespace

const std::vector<OptionField>& option_fields() {
  static const std::vector<OptionField> fields = make_fields();
  return fields;
}

const OptionField* find_option_field(std::string_view key) {
  for (const OptionField& f : option_fields()) {
    if (key == f.key) return &f;
  }
  return nullptr;
}

std::string both_sizes_detail(const SizePair& p) {
  const std::string blocks = p.blocks, gb = p.gb;
  return "sizes the " + std::string(p.tier) + " tier, and so does cache_config." + gb + "; drop one of them: drop " +
         blocks + " to size it in GiB, or drop " + gb + " to size it in blocks";
}

std::vector<std::string> split_dirs(const Json& value) {
  if (value.is_null()) return {};
  if (value.is_array()) return value.get<std::vector<std::string>>();
  const std::string text = value.get<std::string>();
  if (text.find(';') == std::string::npos) return {text};
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string::npos) end = text.size();
    const std::string piece = trim(std::string_view(text).substr(start, end - start));
    if (!piece.empty()) out.push_back(piece);
    start = end + 1;
  }
  return out;
}

}  // namespace flexkv::detail
