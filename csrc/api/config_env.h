// FLEXKV_<KEY> environment values, parsed as Python's config_file parses them:
// "1/true/yes/on" and "0/false/no/off" for booleans, Python's int() and
// float() spellings, "", "none" and "null" for a key that may be null, ';'
// between directories, JSON text for an object. Private to the config reader.
#pragma once

#include <string>

#include "config_schema.h"

namespace flexkv::detail {

// The value of `var`=`text` for the key `spec`. Throws ConfigKeyError naming
// the variable and what it would accept.
Json parse_env_value(const std::string& var, const std::string& text, const KeySpec& spec);

}  // namespace flexkv::detail
