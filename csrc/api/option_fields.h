// The fields of CacheOptions by config key name: how the config reader sets
// them from a JSON value, how validate() and the Python binding read them back.
// A cache_config key without a field here is still read and checked (type,
// range) but has no effect on the C++ side; every field here must be a key of
// config_keys.json (option_fields() throws std::logic_error otherwise).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "config_schema.h"
#include "flexkv/cache_options.h"

namespace flexkv::detail {

struct OptionField {
  const char* key;  // the cache_config key
  // Stores a value already checked against the key's type; throws
  // ConfigKeyError when it does not fit the field's C++ type.
  void (*set)(CacheOptions& options, const Json& value, const KeySpec& spec);
  // The field as the config would write it (null for an unset optional).
  Json (*get)(const CacheOptions& options);
};

// Every field, in config_keys.json's order.
const std::vector<OptionField>& option_fields();
const OptionField* find_option_field(std::string_view key);

// The key pairs that size one tier, in blocks or in GiB; a config gives one of each pair.
struct SizePair {
  const char* blocks;
  const char* gb;
  const char* tier;
};
inline constexpr SizePair kSizePairs[] = {{"num_cpu_blocks", "cpu_cache_gb", "CPU"},
                                          {"num_ssd_blocks", "ssd_cache_gb", "SSD"}};
// The error detail for a config that gives both keys of `pair`, keyed by pair.blocks.
std::string both_sizes_detail(const SizePair& pair);

// `ssd_cache_dir`'s value as a list: a string without ';' is one directory, one
// with ';' is split there (pieces trimmed, empty pieces dropped), as Python's CacheConfig does.
std::vector<std::string> split_dirs(const Json& value);

}  // namespace flexkv::detail
