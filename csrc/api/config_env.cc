#include "config_env.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

namespace flexkv::detail {

namespace {

// Python's int(): optional sign, digits, single underscores between digits.
std::optional<int64_t> parse_env_int(const std::string& s) {
  size_t i = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
  std::string digits = s.substr(0, i);
  bool last_digit = false;
  for (; i < s.size(); ++i) {
    if (std::isdigit(static_cast<unsigned char>(s[i]))) {
      digits += s[i];
      last_digit = true;
    } else if (s[i] == '_' && last_digit && i + 1 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      last_digit = false;
    } else {
      return std::nullopt;
    }
  }
  if (!last_digit) return std::nullopt;
  errno = 0;
  const long long v = std::strtoll(digits.c_str(), nullptr, 10);
  if (errno == ERANGE) return std::nullopt;
  return v;
}

// Python's float(): decimal notation, inf / infinity / nan with an optional sign.
std::optional<double> parse_env_float(const std::string& s) {
  std::string t = lower(s);
  size_t i = (!t.empty() && (t[0] == '+' || t[0] == '-')) ? 1 : 0;
  const std::string word = t.substr(i);
  if (word == "inf" || word == "infinity") return t[0] == '-' ? -HUGE_VAL : HUGE_VAL;
  if (word == "nan") return std::nan("");
  size_t digits = 0;
  auto run = [&] {
    const size_t start = i;
    while (i < t.size() && (std::isdigit(static_cast<unsigned char>(t[i])) ||
                            (t[i] == '_' && i > start && i + 1 < t.size() &&
                             std::isdigit(static_cast<unsigned char>(t[i + 1]))))) {
      ++i;
    }
    digits += i - start;
  };
  run();
  if (i < t.size() && t[i] == '.') {
    ++i;
    run();
  }
  if (digits == 0) return std::nullopt;
  if (i < t.size() && t[i] == 'e') {
    ++i;
    if (i < t.size() && (t[i] == '+' || t[i] == '-')) ++i;
    const size_t before = digits;
    run();
    if (digits == before) return std::nullopt;
  }
  if (i != t.size()) return std::nullopt;
  t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
  return std::strtod(t.c_str(), nullptr);
}

}  // namespace

Json parse_env_value(const std::string& var, const std::string& text, const KeySpec& spec) {
  const std::string stripped = trim(text);
  const std::string low = lower(stripped);
  if (spec.nullable && (low.empty() || low == "none" || low == "null")) return nullptr;
  std::vector<std::string> expected;
  auto expect = [&expected](const std::string& what) {
    if (std::find(expected.begin(), expected.end(), what) == expected.end()) expected.push_back(what);
  };
  switch (spec.type) {
    case KeyType::kBool:
      for (const char* t : {"1", "true", "yes", "on"}) {
        if (low == t) return true;
      }
      for (const char* f : {"0", "false", "no", "off"}) {
        if (low == f) return false;
      }
      expect("true or false (1/0, true/false, yes/no, on/off)");
      break;
    case KeyType::kInt:
      if (auto v = parse_env_int(stripped)) return *v;
      expect("an integer");
      break;
    case KeyType::kFloat:
      if (auto v = parse_env_float(stripped)) {
        if (std::isfinite(*v)) return *v;
        expect("a finite number");
      } else {
        expect("a number");
      }
      break;
    case KeyType::kString:
    case KeyType::kDirs:
      if (!stripped.empty()) return stripped;
      if (spec.type == KeyType::kDirs) return Json::array();  // a list of no directory
      expect("a non-empty string");
      break;
    case KeyType::kObject:
      try {
        Json v = Json::parse(stripped);
        if (v.is_object()) return v;
        expect("a JSON object such as '{\"endpoint\": \"s3.amazonaws.com\"}'");
      } catch (const Json::parse_error& e) {
        expect("a JSON object (not valid JSON at column " + std::to_string(e.byte) + ")");
      }
      break;
    default:
      expect(describe_type(spec));
  }
  throw ConfigKeyError(spec.key(), "environment variable " + var + "='" + text + "' is not valid: expected " +
                                       join(expected, " or "));
}

}  // namespace flexkv::detail
