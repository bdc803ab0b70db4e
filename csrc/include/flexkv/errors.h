// The exceptions FlexKV throws on purpose. Each message names the argument or
// config key at fault and says what would work. All derive from the standard
// exceptions a caller may already catch.
#pragma once

#include <stdexcept>
#include <string>

namespace flexkv {

// A config value is missing, unknown, of the wrong type or does not fit this
// machine. key() is the dotted key ("cache_config.num_cpu_blocks"), or "" when
// the problem is not about one key.
class ConfigError : public std::invalid_argument {
 public:
  ConfigError(const std::string& message, std::string key = "")
      : std::invalid_argument(message), key_(std::move(key)) {}
  const std::string& key() const { return key_; }

 private:
  std::string key_;
};

// A task call got bad arguments (tokens, block ids, slot mappings) or came at
// the wrong time (an unknown task, a second launch, before registration).
class TaskError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Registered KV memory does not match its description or the model.
class LayoutError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace flexkv
