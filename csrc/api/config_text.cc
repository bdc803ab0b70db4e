#include "config_text.h"

#include <algorithm>
#include <cctype>
#include <set>
#include <stdexcept>
#include <vector>

namespace flexkv::detail {

namespace {

constexpr const char* kWhitespace = " \t\n\r\f\v";

// `text` with // and /* */ comments outside strings blanked (positions kept).
std::string blank_comments(std::string_view text) {
  std::string out(text);
  bool in_string = false;
  for (size_t i = 0; i < out.size(); ++i) {
    if (in_string) {
      if (out[i] == '\\') ++i;
      else if (out[i] == '"') in_string = false;
    } else if (out[i] == '"') {
      in_string = true;
    } else if (out.compare(i, 2, "//") == 0) {
      for (; i < out.size() && out[i] != '\n'; ++i) out[i] = ' ';
    } else if (out.compare(i, 2, "/*") == 0) {
      const size_t end = out.find("*/", i + 2);
      const size_t stop = end == std::string::npos ? out.size() : end + 2;
      for (; i < stop; ++i) {
        if (out[i] != '\n') out[i] = ' ';
      }
      --i;
    }
  }
  return out;
}

// The start of the token that ends at `at` (nlohmann reports a token's last byte).
size_t token_start(std::string_view text, size_t at) {
  if (at >= text.size()) return at;
  if (text[at] == '"') {
    for (size_t i = at; i-- > 0;) {
      if (text[i] == '"' && (i == 0 || text[i - 1] != '\\')) return i;
    }
    return at;
  }
  auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '-' || c == '.'; };
  while (at > 0 && word(text[at]) && word(text[at - 1])) --at;
  return at;
}

[[noreturn]] void syntax_error(std::string_view text, const std::string& where, const Json::parse_error& e) {
  const size_t at = token_start(text, std::min<size_t>(e.byte > 0 ? e.byte - 1 : 0, text.size()));
  const size_t line = 1 + static_cast<size_t>(std::count(text.begin(), text.begin() + at, '\n'));
  const size_t line_start = text.rfind('\n', at == 0 ? 0 : at - 1);
  const size_t column = line_start == std::string_view::npos || at == 0 ? at + 1 : at - line_start;
  std::string what = e.what();
  const size_t cut = what.find(": ", what.find("column"));
  if (cut != std::string::npos) what = what.substr(cut + 2);
  const std::string cleaned = blank_comments(text);
  if (at < cleaned.size() && (cleaned[at] == '}' || cleaned[at] == ']')) {
    const size_t before = cleaned.find_last_not_of(kWhitespace, at == 0 ? 0 : at - 1);
    if (at > 0 && before != std::string::npos && cleaned[before] == ',') {
      what += " (a trailing comma before a closing bracket: JSON does not allow one, remove it)";
    }
  }
  throw std::invalid_argument(where + ":" + std::to_string(line) + ":" + std::to_string(column) +
                              ": not valid JSON: " + what);
}

}  // namespace

Json parse_config_text(std::string_view text, const std::string& where) {
  std::vector<std::set<std::string>> seen;  // keys of each open object
  std::vector<std::string> path;            // the key leading to each open object, then the current key
  Json::parser_callback_t on_event = [&](int, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      seen.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      seen.pop_back();
      path.resize(seen.size());
    } else if (event == Json::parse_event_t::key) {
      path.resize(seen.size());
      path.back() = parsed.get<std::string>();
      if (!seen.back().insert(path.back()).second) {
        throw std::invalid_argument(where + ": " + join(path, ".") + ": given twice; keep one");
      }
    }
    return true;
  };
  try {
    return Json::parse(text, on_event, /*allow_exceptions=*/true, /*ignore_comments=*/true);
  } catch (const Json::parse_error& e) {
    syntax_error(text, where, e);
  } catch (const Json::exception& e) {
    std::string what = e.what();
    const size_t cut = what.find("] ");
    throw std::invalid_argument(where + ": not valid JSON: " + (cut == std::string::npos ? what : what.substr(cut + 2)));
  }
}

}  // namespace flexkv::detail
