#include "config_reader.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "config_env.h"
#include "config_schema.h"
#include "config_text.h"
#include "option_fields.h"

extern char** environ;

namespace flexkv::detail {

namespace {

std::string upper(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  return s;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// `'text'` as Python's repr() writes a string without quotes or backslashes in it (errors match Python's).
std::string quoted(const std::string& text) { return "'" + text + "'"; }

bool is_env_name(const std::string& name) {
  if (name.empty() || std::isdigit(static_cast<unsigned char>(name[0]))) return false;
  return std::all_of(name.begin(), name.end(), [](unsigned char c) { return std::isalnum(c) || c == '_'; });
}

// `value` with each ${NAME} replaced by env's NAME and each $${ by ${; the rules and the errors are those of
// core/env_refs.py: an unset NAME, or a ${ that does not close with a name, names `key` and the variable.
std::string expand_env_string(const std::string& value, const EnvVars& env, const std::string& key) {
  std::string out;
  size_t i = 0;
  while (i < value.size()) {
    if (value.compare(i, 3, "$${") == 0) {
      out += "${";
      i += 3;
    } else if (value.compare(i, 2, "${") == 0) {
      const size_t close = value.find('}', i + 2);
      const std::string name = value.substr(i + 2, close == std::string::npos ? std::string::npos : close - i - 2);
      if (close == std::string::npos || !is_env_name(name)) {
        const std::string ref = value.substr(i, close == std::string::npos ? std::string::npos : close - i + 1);
        throw ConfigKeyError(key, quoted(value) + " has " + quoted(ref) + ", which is not a ${NAME} reference; write "
                                  "${NAME} with NAME a variable name (letters, digits, _), or $${ for a literal ${");
      }
      const auto it = env.find(name);
      if (it == env.end()) {
        throw ConfigKeyError(key, quoted(value) + " refers to ${" + name + "}, but the environment variable " + name +
                                  " is not set; set it in each process's environment (export " + name +
                                  "=0), or write the value without ${...}");
      }
      out += it->second;
      i = close + 1;
    } else {
      out += value[i++];
    }
  }
  return out;
}

// Every string value of parsed config data expanded (env_refs.py); `key` is the dotted path of `data`.
void expand_env_refs(Json& data, const EnvVars& env, const std::string& key) {
  if (data.is_string()) {
    const std::string& text = data.get_ref<const std::string&>();
    if (text.find("${") != std::string::npos) data = expand_env_string(text, env, key.empty() ? "config" : key);
  } else if (data.is_object()) {
    for (auto it = data.begin(); it != data.end(); ++it) {
      expand_env_refs(it.value(), env, key.empty() ? it.key() : key + "." + it.key());
    }
  } else if (data.is_array()) {
    for (size_t i = 0; i < data.size(); ++i) expand_env_refs(data[i], env, key + "[" + std::to_string(i) + "]");
  }
}

// A key's value, from the file or the environment.
struct Given {
  std::string name;
  Json value;
};

// A value of one of the original FlexKV's keys, for the key here it names.
struct Mapped {
  std::string target, section, field;
  Json value;
  std::string original;
};

// The CPU tier when nothing sizes it (no config file, no size in the environment): the original FlexKV's default.
constexpr double kDefaultCpuCacheGb = 16.0;

class Reader {
 public:
  Reader(std::string where, const EnvVars* env, bool no_file = false)
      : where_(std::move(where)), env_(env), no_file_(no_file), schema_(config_schema()) {}

  ConfigRead read(std::string_view text) {
    Json root = parse_config_text(text, where_);
    if (!root.is_object()) {
      throw std::invalid_argument(where_ + ": the config is " + describe_value(root) +
                                  "; it must be an object such as {\"cache_config\": {\"num_cpu_blocks\": 50000}}");
    }
    try {
      expand_env_refs(root, env_ != nullptr ? *env_ : process_env(), "");  // ${NAME} in string values
      split_layout(root);
      if (env_ != nullptr) apply_env();
      if (no_file_ && find(cache_, "num_cpu_blocks") == nullptr && find(cache_, "cpu_cache_gb") == nullptr) {
        cache_.push_back({"cpu_cache_gb", kDefaultCpuCacheGb});
        warnings_.push_back("no config file found (FLEXKV_CONFIG_PATH is unset); using the defaults with a 16 GiB "
                            "CPU tier. Set FLEXKV_CONFIG_PATH to a config file, or FLEXKV_CPU_CACHE_GB to size the "
                            "CPU tier");
      }
      ConfigRead out;
      out.options = build();
      out.warnings = std::move(warnings_);
      return out;
    } catch (const ConfigKeyError& e) {
      const auto source = sources_.find(e.key());
      throw std::invalid_argument(where_ + ": " + e.what() +
                                  (source == sources_.end() ? "" : " (set by " + source->second + ")"));
    }
  }

 private:
  using Homes = std::vector<std::pair<std::string, std::string>>;  // key -> the section it belongs in

  static Given* find(std::vector<Given>& values, const std::string& name) {
    for (Given& g : values) {
      if (g.name == name) return &g;
    }
    return nullptr;
  }

  static void set_home(Homes& homes, const std::string& key, const std::string& home) {
    for (auto& [k, h] : homes) {
      if (k == key) {
        h = home;
        return;
      }
    }
    homes.emplace_back(key, home);
  }

  std::vector<std::string> names(const char* section) const {
    std::vector<std::string> out;
    for (const KeySpec& s : schema_.section(section)) out.push_back(s.name);
    return out;
  }

  bool is_short(const std::string& name) const {
    return std::find(schema_.short_form.begin(), schema_.short_form.end(), name) != schema_.short_form.end();
  }

  [[noreturn]] void unknown_key(const std::string& path, const std::string& key, const std::vector<std::string>& valid,
                                const Homes& homes) const {
    const std::string full = path.empty() ? key : path + "." + key;
    for (const auto& [k, home] : homes) {
      if (k != key) continue;
      if (home == "the top level") throw ConfigKeyError(full, "not a key here; it belongs at the top level of the file");
      throw ConfigKeyError(full, "not a key here; it belongs in " + home + " (move it to " + home + "." + key + ")");
    }
    std::vector<std::pair<std::string, std::string>> candidates;  // name -> how to write it
    for (const auto& v : valid) candidates.emplace_back(v, v);
    for (const auto& [k, home] : homes) {
      const bool known = std::any_of(candidates.begin(), candidates.end(), [&k](const auto& c) { return c.first == k; });
      if (!known) candidates.emplace_back(k, home == "the top level" ? k : home + "." + k);
    }
    std::vector<std::string> words;
    for (const auto& c : candidates) words.push_back(c.first);
    std::vector<std::string> close;
    for (const auto& w : close_matches(key, words)) {
      close.push_back(std::find_if(candidates.begin(), candidates.end(), [&w](const auto& c) { return c.first == w; })
                          ->second);
    }
    const std::string hint = close.empty() ? "" : "did you mean " + join(close, " or ") + "? ";
    throw ConfigKeyError(full, "unknown key; " + hint + "valid keys " + (path.empty() ? "at the top level" : "in " + path) +
                                   ": " + join(valid, ", "));
  }

  static void add_home(Homes& homes, const std::string& key, const std::string& home) {
    for (const auto& [k, h] : homes) {
      if (k == key) return;
    }
    homes.emplace_back(key, home);
  }

  // The original's mapped keys that belong in another section than `section`, as homes of an unknown key.
  void upstream_homes(Homes& homes, const std::string& section) const {
    for (const UpstreamKey& u : schema_.upstream) {
      if (!u.section.empty() && u.section != section) add_home(homes, u.name, u.section);
    }
  }

  // An original FlexKV key's value as the value of the key here (through its value table, if it has one).
  static Json convert(const UpstreamKey& up, const Json& value) {
    if (up.values.empty()) return value;
    if (!value.is_boolean()) {
      const std::string text = lower(trim(value.is_string() ? value.get<std::string>() : value.dump()));
      for (const auto& [t, mapped] : up.values) {
        if (t == text) return mapped;
      }
    }
    std::vector<std::string> allowed;
    for (const auto& [t, mapped] : up.values) allowed.push_back(t);
    throw ConfigKeyError(up.name, "= " + value.dump() + " is not valid; use one of: " + join(allowed, ", ") +
                                      " (the original FlexKV's meaning; here it sets " + up.section + "." + up.field +
                                      ")");
  }

  // An original FlexKV key in the file: remember its value for the key here, or that it has no effect.
  void note_upstream(const UpstreamKey& up, const Json& value) {
    if (up.section.empty()) {
      if (std::find(ignored_.begin(), ignored_.end(), up.name) == ignored_.end()) ignored_.push_back(up.name);
      return;
    }
    const Json v = convert(up, value);
    const std::string target = up.section + "." + up.field;
    for (const Mapped& m : mapped_) {
      if (m.target != target) continue;
      if (m.value != v) {
        throw ConfigKeyError(target, up.name + " and " + m.original + " both set " + target +
                                         ", to different values; keep one");
      }
      return;
    }
    mapped_.push_back({target, up.section, up.field, v, up.name});
  }

  void apply_mapped() {
    for (const Mapped& m : mapped_) {
      std::vector<Given>* into = &cache_;
      if (m.section == "model_config") {
        if (!model_) model_.emplace();
        into = &*model_;
      }
      if (find(*into, m.field) != nullptr) {
        throw ConfigKeyError(m.target, m.original + " (the original FlexKV's name of " + m.target + ") and " +
                                           m.target + " are both given; keep one");
      }
      const KeySpec& spec = schema_.at(m.section, m.field);
      if (spec.type == KeyType::kDType && !m.value.is_string()) {
        throw ConfigKeyError(m.target, m.original + " must be a string such as \"bfloat16\", got " +
                                           describe_value(m.value));
      }
      check_type(spec, m.value, m.original);
      into->push_back({m.field, m.value});
      if (m.original != m.field) sources_[m.target] = "the original FlexKV's key '" + m.original + "'";
    }
    if (!ignored_.empty()) {
      warnings_.push_back("the original FlexKV's key(s) " + join(ignored_, ", ") +
                          " have no effect here and are ignored; `flexkv check-config` explains each");
    }
  }

  // The original's benchmark files name their sections ModelConfig and CacheConfig.
  Json renamed(const Json& root) const {
    Json out = root;
    for (const auto& [theirs, ours] : schema_.upstream_sections) {
      if (!out.contains(theirs)) continue;
      if (out.contains(ours)) {
        throw ConfigKeyError(ours, theirs + " (the original FlexKV's name of " + ours + ") and " + ours +
                                       " are both given; keep one");
      }
      out[ours] = out.at(theirs);
      out.erase(theirs);
    }
    return out;
  }

  static void check_type(const KeySpec& spec, const Json& value, const std::string& label) {
    const std::string problem = type_problem(spec, value);
    if (!problem.empty()) throw ConfigKeyError(label, problem);
  }

  // Python's _split_layout: keys and types of the three sections.
  void split_layout(const Json& file_root) {
    const Json root = renamed(file_root);
    const std::vector<std::string> cache_keys = names("cache_config"), model_keys = names("model_config");
    std::vector<std::string> top_valid = names("top_level");
    top_valid.insert(top_valid.end(), schema_.short_form.begin(), schema_.short_form.end());

    for (const auto& [key, value] : root.items()) {
      if (std::find(top_valid.begin(), top_valid.end(), key) == top_valid.end()) {
        if (const UpstreamKey* up = schema_.find_upstream(key)) {
          note_upstream(*up, value);
          continue;
        }
        Homes homes;
        for (const auto& k : cache_keys) {
          if (!is_short(k)) set_home(homes, k, "cache_config");
        }
        for (const auto& k : model_keys) set_home(homes, k, "model_config");
        unknown_key("", key, top_valid, homes);
      }
      if (const KeySpec* spec = schema_.find("top_level", key); spec && spec->type != KeyType::kSection) {
        check_type(*spec, value, key);
        top_.push_back({key, value});
      } else if (is_short(key)) {
        check_type(schema_.at("cache_config", key), value, key);
        cache_.push_back({key, value});
        sources_["cache_config." + key] = "top-level key '" + key + "'";
      }
    }

    if (root.contains("cache_config") && !root.at("cache_config").is_null()) {
      const Json& section = root.at("cache_config");
      if (!section.is_object()) {
        throw ConfigKeyError("cache_config", "must be an object ({...}), got " + describe_value(section));
      }
      for (const auto& [key, value] : section.items()) {
        if (std::find(cache_keys.begin(), cache_keys.end(), key) == cache_keys.end()) {
          const UpstreamKey* up = schema_.find_upstream(key);
          if (up != nullptr && (up->section.empty() || up->section == "cache_config")) {
            note_upstream(*up, value);
            continue;
          }
          Homes homes;
          for (const auto& k : model_keys) set_home(homes, k, "model_config");
          for (const auto& k : names("top_level")) set_home(homes, k, "the top level");
          upstream_homes(homes, "cache_config");
          unknown_key("cache_config", key, cache_keys, homes);
        }
        if (find(cache_, key) != nullptr) {
          throw ConfigKeyError("cache_config." + key, "given both at the top level and in cache_config; keep one");
        }
        check_type(schema_.at("cache_config", key), value, "cache_config." + key);
        cache_.push_back({key, value});
      }
    }

    if (root.contains("model_config") && !root.at("model_config").is_null()) {
      const Json& section = root.at("model_config");
      if (!section.is_object()) {
        throw ConfigKeyError("model_config", "must be an object ({...}), got " + describe_value(section));
      }
      model_.emplace();
      for (const auto& [key, value] : section.items()) {
        if (std::find(model_keys.begin(), model_keys.end(), key) == model_keys.end()) {
          const UpstreamKey* up = schema_.find_upstream(key);
          if (up != nullptr && (up->section.empty() || up->section == "model_config")) {
            note_upstream(*up, value);
            continue;
          }
          Homes homes;
          for (const auto& k : cache_keys) set_home(homes, k, "cache_config");
          for (const auto& k : names("top_level")) set_home(homes, k, "the top level");
          upstream_homes(homes, "model_config");
          unknown_key("model_config", key, model_keys, homes);
        }
        const KeySpec& spec = schema_.at("model_config", key);
        if (spec.type == KeyType::kDType && !value.is_string()) {
          throw ConfigKeyError(spec.key(), "must be a string such as \"bfloat16\", got " + describe_value(value));
        }
        check_type(spec, value, spec.key());
        model_->push_back({key, value});
      }
    }

    apply_mapped();
    for (const SizePair& pair : kSizePairs) {
      const Given* gb = find(cache_, pair.gb);
      if (find(cache_, pair.blocks) != nullptr && gb != nullptr && !gb->value.is_null()) {
        throw ConfigKeyError(std::string("cache_config.") + pair.blocks, both_sizes_detail(pair));
      }
    }
  }

  // Python's _apply_env: FLEXKV_<KEY> for the top-level values and every cache_config key.
  void apply_env() {
    std::vector<std::pair<std::string, const KeySpec*>> table;
    for (const KeySpec& s : schema_.top_level) {
      if (s.type != KeyType::kSection) table.emplace_back("FLEXKV_" + upper(s.name), &s);
    }
    for (const KeySpec& s : schema_.cache_config) table.emplace_back("FLEXKV_" + upper(s.name), &s);
    std::vector<std::string> table_names;
    for (const auto& [var, spec] : table) table_names.push_back(var);

    std::vector<std::pair<std::string, std::pair<std::string, Json>>> given;  // name -> (variable, value)
    std::vector<std::string> env_ignored;  // the original's variables without effect here
    for (const auto& [var, text] : *env_) {  // sorted by name, as Python sorts them
      if (!starts_with(var, "FLEXKV_")) continue;
      const auto& reserved = schema_.reserved_env_names;
      if (std::find(reserved.begin(), reserved.end(), var) != reserved.end()) continue;
      const auto& prefixes = schema_.reserved_env_prefixes;
      if (std::any_of(prefixes.begin(), prefixes.end(), [&var](const std::string& p) { return starts_with(var, p); })) {
        continue;
      }
      const auto entry = std::find_if(table.begin(), table.end(), [&var](const auto& t) { return t.first == var; });
      const auto up_var = std::find_if(schema_.upstream_env.begin(), schema_.upstream_env.end(),
                                       [&var](const auto& u) { return u.first == var; });
      if (entry == table.end() && up_var != schema_.upstream_env.end()) {  // the original FlexKV's variable
        const UpstreamKey& up = *schema_.find_upstream(up_var->second);
        if (up.section.empty()) {
          if (std::find(env_ignored.begin(), env_ignored.end(), up.name) == env_ignored.end()) {
            env_ignored.push_back(up.name);
          }
          continue;
        }
        if (up.section == "model_config") continue;  // the model shape comes from the engine
        const KeySpec& spec = schema_.at(up.section, up.field);
        Json value;
        try {
          value = up.values.empty() ? parse_env_value(var, text, spec) : convert(up, Json(text));
        } catch (const ConfigKeyError& e) {
          throw std::invalid_argument(where_ + ": " + e.what());
        }
        for (const auto& g : given) {
          if (g.first == spec.name) {
            throw std::invalid_argument(where_ + ": " + spec.key() + ": environment variables " + var + " and " +
                                        g.second.first + " both set " + spec.key() + "; unset one of them");
          }
        }
        given.push_back({spec.name, {var, value}});
        std::vector<Given>& values = spec.section == "top_level" ? top_ : cache_;
        if (Given* g = find(values, spec.name)) {
          g->value = value;
        } else {
          values.push_back({spec.name, value});
        }
        sources_[spec.key()] = "environment variable " + var + " (the original FlexKV's name)";
        continue;
      }
      if (entry == table.end()) {
        const auto close = close_matches(var, table_names, 1);
        warnings_.push_back("ignoring environment variable " + var + ": it is not a FlexKV config key" +
                            (close.empty() ? "" : "; did you mean " + close[0] + "?"));
        continue;
      }
      const KeySpec& spec = *entry->second;
      Json value;
      try {
        value = parse_env_value(var, text, spec);
      } catch (const ConfigKeyError& e) {
        throw std::invalid_argument(where_ + ": " + e.what());  // names its variable; no "(set by ...)"
      }
      given.push_back({spec.name, {var, value}});
      std::vector<Given>& values = spec.section == "top_level" ? top_ : cache_;
      if (Given* g = find(values, spec.name)) {
        g->value = value;
      } else {
        values.push_back({spec.name, value});
      }
      sources_[spec.key()] = "environment variable " + var;
    }

    if (!env_ignored.empty()) {
      warnings_.push_back("environment: the original FlexKV's key(s) " + join(env_ignored, ", ") +
                          " have no effect here and are ignored; `flexkv check-config` explains each");
    }
    auto given_value = [&given](const std::string& name) -> const std::pair<std::string, Json>* {
      for (const auto& g : given) {
        if (g.first == name) return &g.second;
      }
      return nullptr;
    };
    for (const SizePair& pair : kSizePairs) {
      const auto* blocks = given_value(pair.blocks);
      const auto* gb = given_value(pair.gb);
      if (blocks != nullptr && gb != nullptr && !gb->second.is_null()) {
        throw std::invalid_argument(where_ + ": cache_config." + pair.blocks + ": environment variables " + blocks->first +
                                    " and " + gb->first + " both size the same tier; unset one of them");
      }
      // A size from the environment replaces the file's other size of the same tier.
      for (const auto& [mine, other] : {std::pair(pair.blocks, pair.gb), std::pair(pair.gb, pair.blocks)}) {
        const auto* g = given_value(mine);
        if (g != nullptr && !g->second.is_null() && given_value(other) == nullptr) {
          cache_.erase(std::remove_if(cache_.begin(), cache_.end(), [&](const Given& c) { return c.name == other; }),
                       cache_.end());
        }
      }
    }
  }

  ModelShape build_model() const {
    for (const char* required : {"num_layers", "num_kv_heads", "head_size"}) {
      const bool given = std::any_of(model_->begin(), model_->end(), [&](const Given& g) { return g.name == required; });
      if (!given) {
        throw ConfigKeyError(std::string("model_config.") + required,
                             "missing; the C++ API needs num_layers, num_kv_heads and head_size in model_config");
      }
    }
    ModelShape m;
    const std::pair<const char*, int ModelShape::*> ints[] = {{"num_layers", &ModelShape::num_layers},
                                                              {"num_kv_heads", &ModelShape::num_kv_heads},
                                                              {"head_size", &ModelShape::head_size},
                                                              {"tp_size", &ModelShape::tp_size}};
    for (const Given& g : *model_) {
      const KeySpec& spec = schema_.at("model_config", g.name);
      const auto member = std::find_if(std::begin(ints), std::end(ints), [&g](const auto& i) { return g.name == i.first; });
      if (member != std::end(ints)) {
        const bool fits = g.value.is_number_unsigned() ? g.value.get<uint64_t>() <= INT32_MAX
                                                       : g.value.get<int64_t>() >= INT32_MIN && g.value.get<int64_t>() <= INT32_MAX;
        if (!fits) throw ConfigKeyError(spec.key(), g.value.dump() + " does not fit the C++ API's 32-bit field");
        m.*(member->second) = static_cast<int>(g.value.get<int64_t>());  // its range: ModelShape::validate()
      } else if (g.name == "use_mla") {
        m.use_mla = g.value.get<bool>();
      } else if (spec.type == KeyType::kDType) {
        try {
          m.dtype = parse_dtype(g.value.get<std::string>());
        } catch (const std::invalid_argument& e) {
          throw ConfigKeyError(spec.key(), e.what());
        }
      } else {
        check_range(spec, g.value);  // a key the C++ shape does not use (dp_size): checked, not kept
      }
    }
    return m;
  }

  CacheOptions build() const {
    // The top-level values: FlexKVConfig.validate's checks.
    for (const Given& g : top_) {
      const KeySpec& spec = schema_.at("top_level", g.name);
      if (g.name == "server_recv_port" && g.value.get<std::string>().find("://") == std::string::npos) {
        throw ConfigKeyError(g.name, g.value.dump() + " is not a ZeroMQ endpoint; use e.g. "
                                                      "\"ipc:///tmp/flexkv_server\" or \"tcp://127.0.0.1:5555\"");
      }
      check_range(spec, g.value);
    }
    CacheOptions out;
    for (const Given& g : cache_) {
      const KeySpec& spec = schema_.at("cache_config", g.name);
      if (spec.type == KeyType::kDirs && !g.value.is_null() && split_dirs(g.value).empty()) {
        throw ConfigKeyError(spec.key(), "is an empty list; give at least one directory or null");
      }
      if (const OptionField* f = find_option_field(g.name)) {
        f->set(out, g.value, spec);
      } else {
        check_range(spec, g.value);  // a key the C++ API does not use: checked, not kept
      }
    }
    if (model_) out.model = build_model();
    out.validate();
    return out;
  }

  std::string where_;
  const EnvVars* env_;
  bool no_file_;
  const ConfigSchema& schema_;
  std::vector<Mapped> mapped_;
  std::vector<std::string> ignored_;
  std::vector<Given> top_, cache_;
  std::optional<std::vector<Given>> model_;
  std::map<std::string, std::string> sources_;  // key -> what set it, when not its own section of the file
  std::vector<std::string> warnings_;
};

}  // namespace

ConfigRead read_config(std::string_view text, const std::string& where, const EnvVars* env) {
  return Reader(where, env).read(text);
}

ConfigRead read_config_file(const std::string& path, const EnvVars& env) {
  std::string file = path;
  std::string via;
  if (file.empty()) {
    const auto it = env.find("FLEXKV_CONFIG_PATH");
    file = it == env.end() ? "" : trim(it->second);
    if (file.empty()) return Reader("defaults", &env, true).read("{}");
    via = " (from FLEXKV_CONFIG_PATH)";
  }
  const std::string named = "config file '" + file + "'" + via;
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0) {
    throw std::invalid_argument(named + (errno == ENOENT ? " does not exist; check the path, or unset FLEXKV_CONFIG_PATH "
                                                           "to run with the defaults"
                                                         : " cannot be read: " + std::string(std::strerror(errno))));
  }
  if (S_ISDIR(st.st_mode)) throw std::invalid_argument(named + " is a directory; give the path of a .json file inside it");
  const size_t dot = file.rfind('.');
  const std::string suffix = dot == std::string::npos ? "" : lower(file.substr(dot));
  if (suffix == ".yaml" || suffix == ".yml") {
    throw std::invalid_argument(named + " is YAML, which only the Python API reads; write the same keys as JSON "
                                        "for the C++ API (e.g. {\"cpu_cache_gb\": 32})");
  }
  std::ifstream in(file, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  if (!in) throw std::invalid_argument(named + " cannot be read: " + std::string(std::strerror(errno)));
  return read_config(text.str(), file, &env);
}

EnvVars process_env() {
  EnvVars env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    const size_t eq = entry.find('=');
    if (eq != std::string::npos) env[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  return env;
}

std::string options_to_json(const CacheOptions& options) {
  Json out = Json::object();
  for (const OptionField& f : option_fields()) out[f.key] = f.get(options);
  out["num_copy_threads"] = options.num_copy_threads;
  if (options.model) {
    const ModelShape& m = *options.model;
    out["model"] = {{"num_layers", m.num_layers}, {"num_kv_heads", m.num_kv_heads}, {"head_size", m.head_size},
                    {"use_mla", m.use_mla},       {"dtype", dtype_name(m.dtype)},   {"tp_size", m.tp_size},
                    {"fingerprint", m.fingerprint()}};
  } else {
    out["model"] = nullptr;
  }
  return out.dump();
}

}  // namespace flexkv::detail
