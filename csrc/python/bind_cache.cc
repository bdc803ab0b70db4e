// flexkv._core.Cache: the C++ API (flexkv::Cache) as Python sees it, for
// tests and benchmarks that drive the C++ facade next to the Python ones, in
// one process on one control plane (Cache.attach) or on its own (Cache.open).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "api/cache_attach.h"
#include "flexkv/cache.h"

namespace py = pybind11;
using flexkv::Cache;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style>;

flexkv::ModelShape shape_of(const py::dict& d) {
  flexkv::ModelShape m;
  m.num_layers = d["num_layers"].cast<int>();
  m.num_kv_heads = d["num_kv_heads"].cast<int>();
  m.head_size = d["head_size"].cast<int>();
  m.dtype = flexkv::parse_dtype(d["dtype"].cast<std::string>());
  if (d.contains("use_mla")) m.use_mla = d["use_mla"].cast<bool>();
  if (d.contains("tp_size")) m.tp_size = d["tp_size"].cast<int>();
  return m;
}

void check_1d(const I64Array& a, const char* what) {
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be a 1-D int64 array");
}

// Destroyed without the GIL: it waits for its copies, whose threads may log into Python.
std::shared_ptr<Cache> held(std::unique_ptr<Cache> cache) {
  return std::shared_ptr<Cache>(cache.release(), [](Cache* c) {
    if (Py_IsInitialized() && PyGILState_Check()) {
      py::gil_scoped_release nogil;
      delete c;
    } else {
      delete c;
    }
  });
}

const char* state_text(flexkv::TaskState s) {
  switch (s) {
    case flexkv::TaskState::kRunning: return "running";
    case flexkv::TaskState::kDone: return "done";
    case flexkv::TaskState::kFailed: return "failed";
  }
  return "?";
}

}  // namespace

void bind_cache(py::module_& m) {
  py::class_<Cache, std::shared_ptr<Cache>>(m, "Cache", "The C++ API's Cache (flexkv/cache.h).")
      .def_static("open", [](const std::string& config_json, const py::dict& model) {
        const flexkv::CacheOptions options = flexkv::CacheOptions::from_json(config_json);
        const flexkv::ModelShape shape = shape_of(model);
        std::unique_ptr<Cache> cache;
        {
          py::gil_scoped_release nogil;
          cache = Cache::open(options, shape);
        }
        return held(std::move(cache));
      }, py::arg("config_json"), py::arg("model"), "Cache::open over a config's JSON text and a model shape dict.")
      .def_static("attach", [](std::shared_ptr<flexkv::ControlPlane> plane, const py::dict& model) {
        return held(flexkv::CacheAccess::attach(std::move(plane), shape_of(model)));
      }, py::arg("control_plane"), py::arg("model"), "A Cache over a control plane a Python facade already drives.")
      .def_property_readonly("tokens_per_block", &Cache::tokens_per_block)
      .def_property_readonly("block_bytes", &Cache::block_bytes)
      .def("register_block_major_pool", [](Cache& c, uintptr_t base, int64_t num_blocks) {
        const flexkv::ModelShape& s = c.model();
        c.register_memory(flexkv::EngineMemory::block_major_pool(
            reinterpret_cast<void*>(base), s.dtype, num_blocks, s.num_layers, s.kv_factor(),
            static_cast<int64_t>(c.tokens_per_block()) * s.num_kv_heads * s.head_size));
      }, py::arg("base"), py::arg("num_blocks"),
         "Registers host memory at `base` as a pool [num_blocks, layers, kv, tokens_per_block*heads*head_size].")
      .def("match", [](Cache& c, const I64Array& tokens, const std::string& salt) {
        check_1d(tokens, "tokens");
        py::gil_scoped_release nogil;
        return c.match(tokens.data(), static_cast<size_t>(tokens.shape(0)), salt);
      }, py::arg("tokens"), py::arg("salt") = "")
      .def("load", [](Cache& c, const I64Array& tokens, size_t computed, const I64Array& engine_blocks,
                      const std::string& salt) {
        check_1d(tokens, "tokens");
        check_1d(engine_blocks, "engine_blocks");
        flexkv::LoadResult r;
        {
          py::gil_scoped_release nogil;
          r = c.load(tokens.data(), static_cast<size_t>(tokens.shape(0)), computed, engine_blocks.data(),
                     static_cast<size_t>(engine_blocks.shape(0)), salt);
        }
        return py::make_tuple(r.task, r.tokens, r.engine_blocks);
      }, py::arg("tokens"), py::arg("computed_tokens"), py::arg("engine_blocks"), py::arg("salt") = "",
         "(task, tokens, engine blocks) of Cache::load")
      .def("store", [](Cache& c, const I64Array& tokens, const I64Array& engine_blocks, const std::string& salt) {
        check_1d(tokens, "tokens");
        check_1d(engine_blocks, "engine_blocks");
        flexkv::StoreResult r;
        {
          py::gil_scoped_release nogil;
          r = c.store(tokens.data(), static_cast<size_t>(tokens.shape(0)), engine_blocks.data(),
                      static_cast<size_t>(engine_blocks.shape(0)), salt);
        }
        return py::make_tuple(r.task, r.new_blocks, r.cached_blocks);
      }, py::arg("tokens"), py::arg("engine_blocks"), py::arg("salt") = "",
         "(task, new blocks, cached blocks) of Cache::store")
      .def("wait", [](Cache& c, uint64_t task, int64_t timeout_us) {
        std::string error;
        flexkv::TaskState s;
        {
          py::gil_scoped_release nogil;
          s = c.wait(task, timeout_us, &error);
        }
        return py::make_tuple(state_text(s), error);
      }, py::arg("task"), py::arg("timeout_us") = -1)
      .def("poll", [](Cache& c, uint64_t task) {
        std::string error;
        const flexkv::TaskState s = c.poll(task, &error);
        return py::make_tuple(state_text(s), error);
      }, py::arg("task"))
      .def("stats", [](const Cache& c) {
        const flexkv::CacheStats s = c.stats();
        py::dict d;
        d["capacity_blocks"] = s.capacity_blocks;
        d["cached_blocks"] = s.cached_blocks;
        d["locked_blocks"] = s.locked_blocks;
        d["loaded_blocks"] = s.loaded_blocks;
        d["stored_blocks"] = s.stored_blocks;
        d["failed_tasks"] = s.failed_tasks;
        d["tasks_in_flight"] = s.tasks_in_flight;
        d["ssd_cached_blocks"] = s.ssd_cached_blocks;
        d["ssd_hit_blocks"] = s.ssd_hit_blocks;
        d["ssd_written_blocks"] = s.ssd_written_blocks;
        d["ssd_mismatch_blocks"] = s.ssd_mismatch_blocks;
        return d;
      });
}
