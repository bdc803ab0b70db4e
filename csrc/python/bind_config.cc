// The C++ config reader, seen from Python: the tests read one file with both
// readers (flexkv.core.config_file and flexkv::CacheOptions) and compare.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#include "api/config_reader.h"
#include "api/config_schema.h"
#include "flexkv/cache_options.h"

namespace py = pybind11;

namespace {

// A ModelShape from a dict of model_config keys (dp_size is accepted and unused).
flexkv::ModelShape shape_of(const py::dict& model) {
  flexkv::ModelShape m;
  for (const auto& [k, v] : model) {
    const std::string key = py::str(k);
    if (key == "num_layers") m.num_layers = v.cast<int>();
    else if (key == "num_kv_heads") m.num_kv_heads = v.cast<int>();
    else if (key == "head_size") m.head_size = v.cast<int>();
    else if (key == "tp_size") m.tp_size = v.cast<int>();
    else if (key == "use_mla") m.use_mla = v.cast<bool>();
    else if (key == "dtype") m.dtype = flexkv::parse_dtype(py::str(v).cast<std::string>());
    else if (key != "dp_size") throw py::key_error("not a model_config key: " + key);
  }
  return m;
}

py::object as_dict(const flexkv::detail::ConfigRead& read, const std::optional<py::dict>& model) {
  const flexkv::CacheOptions options = model ? read.options.resolved(shape_of(*model)) : read.options;
  py::object out = py::module_::import("json").attr("loads")(flexkv::detail::options_to_json(options));
  out["warnings"] = py::cast(read.warnings);
  return out;
}

}  // namespace

void bind_config(py::module_& m) {
  m.def(
      "read_config_text",
      [](const std::string& text, const std::string& where, const std::optional<flexkv::detail::EnvVars>& env,
         const std::optional<py::dict>& model) {
        return as_dict(flexkv::detail::read_config(text, where, env ? &*env : nullptr), model);
      },
      py::arg("text"), py::arg("where") = "config", py::arg("env") = py::none(), py::arg("model") = py::none(),
      "CacheOptions::from_json(text, where) as a dict: every cache_config key the C++ API reads (ssd_cache_dir as "
      "a list, remote_config_custom as an object), num_copy_threads, model (with its fingerprint) or None, and "
      "warnings. With env (a dict), its FLEXKV_* variables override keys as CacheOptions::from_file applies the "
      "process environment; with model (a dict of model_config keys), the result is resolved(model). "
      "Errors raise ValueError with the C++ message.");
  m.def(
      "read_config_file",
      [](const std::string& path, const flexkv::detail::EnvVars& env, const std::optional<py::dict>& model) {
        return as_dict(flexkv::detail::read_config_file(path, env), model);
      },
      py::arg("path") = "", py::arg("env") = flexkv::detail::EnvVars{}, py::arg("model") = py::none(),
      "CacheOptions::from_file(path) with `env` standing in for the process environment (FLEXKV_CONFIG_PATH "
      "when path is empty, then FLEXKV_* overrides); the dict as read_config_text gives it.");
  m.def("config_keys_json", [] { return std::string(flexkv::detail::config_keys_json()); },
        "The config_keys.json the C++ library was built with.");
}
