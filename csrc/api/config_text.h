// The text of a JSON config as both readers take it: `//` and `/* */`
// comments allowed, a key given twice in one object an error naming its path,
// syntax errors as "<where>:<line>:<column>: not valid JSON: ..." (with a hint
// for a trailing comma). Private to the config reader.
#pragma once

#include <string>
#include <string_view>

#include "config_schema.h"

namespace flexkv::detail {

// Throws std::invalid_argument on a syntax error or a duplicated key.
Json parse_config_text(std::string_view text, const std::string& where);

}  // namespace flexkv::detail
