// The config key table (core/config_keys.json, embedded into the library at
// build time) and the checks derived from it: types, ranges, choices, and the
// wording of their errors. Private to the config reader (config_reader.cc) and
// CacheOptions (cache_options.cc).
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flexkv::detail {

// Objects keep their keys in file order (errors list keys the way the file does).
using Json = nlohmann::ordered_json;

enum class KeyType { kInt, kFloat, kBool, kString, kObject, kDirs, kDType, kSection };

// One line of config_keys.json.
struct KeySpec {
  std::string section;  // "top_level", "cache_config" or "model_config"
  std::string name;
  KeyType type = KeyType::kInt;
  Json default_value;
  bool nullable = false;
  std::optional<double> min, max, above;  // inclusive, inclusive, exclusive
  std::vector<std::string> choices;       // strings the value must be one of (dtype: canonical names)
  std::string hint;                       // what a range error adds in parentheses
  std::string description;

  // "cache_config.evict_ratio", or the bare name at the top level.
  std::string key() const;
  bool has_range() const { return min || max || above; }
};

// A key of the original FlexKV's configs that is not a key here (config_keys.json's "upstream" section).
struct UpstreamKey {
  std::string name;
  std::string section, field;  // the key here with the same meaning; both empty: the key has no effect here
  std::vector<std::pair<std::string, Json>> values;  // the original's value (lower-case text) -> the value here
  std::string reason;                                // why it has no effect here
};

struct ConfigSchema {
  std::vector<KeySpec> top_level, cache_config, model_config;  // file order
  std::vector<std::string> short_form;  // cache_config keys that may also sit at the top level
  std::vector<std::string> reserved_env_names, reserved_env_prefixes;
  std::vector<std::pair<std::string, std::string>> dtype_names;  // accepted name -> canonical name
  std::vector<UpstreamKey> upstream;
  std::vector<std::pair<std::string, std::string>> upstream_sections;  // the original's section name -> ours
  std::vector<std::pair<std::string, std::string>> upstream_env;       // FLEXKV_* variable -> upstream key

  // The original FlexKV's key `name`, or nullptr.
  const UpstreamKey* find_upstream(std::string_view name) const;

  const std::vector<KeySpec>& section(std::string_view name) const;
  // The key `name` of `section`, or nullptr.
  const KeySpec* find(std::string_view section, std::string_view name) const;
  // A key of `section` that must exist (std::logic_error naming it otherwise).
  const KeySpec& at(std::string_view section, std::string_view name) const;
};

// The embedded config_keys.json, parsed once (thread-safe). A malformed table
// throws std::logic_error naming the key at fault.
const ConfigSchema& config_schema();
// The embedded copy of config_keys.json, byte for byte.
std::string_view config_keys_json();

// An error about one config key; what() is "<key>: <detail>". Readers catch it
// to add the file name and where the value came from.
class ConfigKeyError : public std::invalid_argument {
 public:
  ConfigKeyError(std::string key, std::string detail)
      : std::invalid_argument(key + ": " + detail), key_(std::move(key)), detail_(std::move(detail)) {}
  const std::string& key() const { return key_; }
  const std::string& detail() const { return detail_; }

 private:
  std::string key_;
  std::string detail_;
};

// A value as errors show it: `true (a boolean)`, `"16" (a string)`, `100000.0 (a number)`.
std::string describe_value(const Json& v);
// What values a key takes: "an integer", "a string or a list of strings or null", ...
std::string describe_type(const KeySpec& spec);
// Empty when `v` has the key's type (ints count as numbers; a bool is not an int),
// otherwise "must be <type>, got <value>[; <how to write it>]".
std::string type_problem(const KeySpec& spec, const Json& v);
// "an integer >= 1", "a number in [0, 1]", "a number > 0".
std::string expected_range(const KeySpec& spec);
bool in_range(const KeySpec& spec, double value);
// Throws ConfigKeyError when a value of the key's type is outside its range or
// choices (a string key's choices; dtype names are checked by parse_dtype); null passes.
void check_range(const KeySpec& spec, const Json& v);

// Text helpers the readers share: `s` without leading and trailing whitespace
// (as Python's str.strip()), lower-cased, and `parts` joined with `sep`.
std::string trim(std::string_view s);
std::string lower(std::string s);
std::string join(const std::vector<std::string>& parts, const std::string& sep);

// Up to `n` of `candidates` that look like `word` (similarity >= cutoff, best
// first), as Python's difflib.get_close_matches picks them.
std::vector<std::string> close_matches(const std::string& word, const std::vector<std::string>& candidates,
                                       size_t n = 3, double cutoff = 0.6);

}  // namespace flexkv::detail
