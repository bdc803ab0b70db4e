// The config reader behind CacheOptions::from_json / from_file, with the
// environment passed in, so tests and the Python binding can give their own.
// It follows Python's flexkv.core.config_file.load_config for JSON: the same
// layouts, keys, type rules, FLEXKV_<KEY> overrides and size-pair rules.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "flexkv/cache_options.h"

namespace flexkv::detail {

// Environment variables by name.
using EnvVars = std::map<std::string, std::string>;

struct ConfigRead {
  CacheOptions options;
  // Unknown FLEXKV_* variables that were ignored, one sentence each.
  std::vector<std::string> warnings;
};

// Reads the text of a JSON config; `where` names it in errors. ${NAME} in a
// string value is env's NAME (without `env`: this process's). With `env`, its
// FLEXKV_<KEY> variables override single keys.
ConfigRead read_config(std::string_view text, const std::string& where, const EnvVars* env);
// Reads a config file (an empty path: env's FLEXKV_CONFIG_PATH; neither: the
// defaults), then applies env's overrides.
ConfigRead read_config_file(const std::string& path, const EnvVars& env);
// This process's environment variables (FLEXKV_* override keys; any may be a ${NAME}).
EnvVars process_env();
// Every CacheOptions field as JSON text, under its config key name
// (`ssd_cache_dir` holds the list), plus num_copy_threads and model (with its
// fingerprint) or null.
std::string options_to_json(const CacheOptions& options);

}  // namespace flexkv::detail
