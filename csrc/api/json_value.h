// JsonValue: the parsed form of a FlexKV config file, for the C++ API's
// config reader. Accepts standard JSON plus `//` and `/* */` comments (the
// manual's configs carry them). Not part of the public API.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace flexkv::detail {

struct JsonValue {
  enum class Kind { kNull, kBool, kNumber, kString, kArray, kObject };

  Kind kind = Kind::kNull;
  bool boolean = false;
  double number = 0.0;
  bool integral = false;  // a number written without fraction or exponent
  int64_t integer = 0;    // its value, when integral
  std::string text;       // a string's value
  std::vector<JsonValue> items;                            // an array's items
  std::vector<std::pair<std::string, JsonValue>> members;  // an object's members, in file order

  // The member named `key` of an object, or nullptr.
  const JsonValue* find(std::string_view key) const;
  // A short rendering for error messages: `true`, `"abc"`, `12`, `an object`.
  std::string describe() const;
};

// Parses `text`. Throws std::invalid_argument "<where>:<line>:<column>: <what>"
// on a syntax error or a key repeated in one object.
JsonValue parse_json(std::string_view text, const std::string& where);

}  // namespace flexkv::detail
