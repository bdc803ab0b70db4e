// flexkv._core support: FlexKV's C++ exceptions as flexkv.core.errors
// classes, log lines into Python's `flexkv` logger and the fault-injecting I/O
// env the SSD tier can be given.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "control/log.h"
#include "flexkv/errors.h"
#include "transfer/io_env.h"

namespace py = pybind11;

namespace {

// Raises flexkv.core.errors.<name>(message[, key]). The module is imported on first use: the errors
// module does not import _core, so there is no cycle.
[[noreturn]] void raise_flexkv(const char* name, const std::string& message, const std::string* key) {
  py::object cls = py::module_::import("flexkv.core.errors").attr(name);
  py::object err = key != nullptr ? cls(message, key->empty() ? py::object(py::none()) : py::object(py::str(*key)))
                                  : cls(message);
  PyErr_SetObject(cls.ptr(), err.ptr());
  throw py::error_already_set();
}

int python_level(flexkv::LogLevel level) {
  switch (level) {
    case flexkv::LogLevel::kDebug: return 10;
    case flexkv::LogLevel::kInfo: return 20;
    case flexkv::LogLevel::kWarning: return 30;
    case flexkv::LogLevel::kError: return 40;
  }
  return 30;
}

}  // namespace

void bind_support(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    if (!p) return;
    try {
      std::rethrow_exception(p);
    } catch (const flexkv::ConfigError& e) {
      raise_flexkv("ConfigError", e.what(), &e.key());
    } catch (const flexkv::TaskError& e) {
      raise_flexkv("TaskError", e.what(), nullptr);
    } catch (const flexkv::LayoutError& e) {
      raise_flexkv("LayoutError", e.what(), nullptr);
    }
  });

  m.def("set_log_sink", [](py::object logger) {
    if (logger.is_none()) {
      flexkv::set_log_sink(nullptr);
      return;
    }
    // Held for the process's life: the sink may be called from any C++ thread.
    auto* held = new py::object(std::move(logger));
    flexkv::set_log_sink([held](flexkv::LogLevel level, const std::string& message) {
      if (!Py_IsInitialized()) return;
      py::gil_scoped_acquire gil;
      try {
        held->attr("log")(python_level(level), "%s", message);
      } catch (const py::error_already_set&) {
        PyErr_Clear();  // a logging failure must not become the caller's failure
      }
    });
  }, py::arg("logger"), "Routes the core's log lines to logger.log(level, msg); None restores stderr.");

  py::class_<flexkv::IoEnv, std::shared_ptr<flexkv::IoEnv>>(m, "IoEnv", "Where the SSD tier's file I/O goes.");
  py::class_<flexkv::FaultInjectingEnv, flexkv::IoEnv, std::shared_ptr<flexkv::FaultInjectingEnv>>(
      m, "FaultInjectingIoEnv",
      "An I/O env for the SSD tier that fails or tears chosen requests (tests). Give it to a cache as ssd_env.")
      .def(py::init([](const std::string& base, unsigned queue_depth) {
             std::unique_ptr<flexkv::IoEnv> env;
             if (base == "io_uring") {
               env = flexkv::make_uring_env(queue_depth);
             } else if (base == "threads") {
               env = flexkv::make_thread_env(4);
             } else if (base == "auto") {
               std::string why;
               env = flexkv::make_default_env(queue_depth, 4, &why);
             } else {
               throw py::value_error("base must be 'auto', 'io_uring' or 'threads', got '" + base + "'");
             }
             return std::make_shared<flexkv::FaultInjectingEnv>(std::move(env));
           }),
           py::arg("base") = "auto", py::arg("queue_depth") = 512)
      .def_property_readonly("name", &flexkv::FaultInjectingEnv::name)
      .def("fail_writes", &flexkv::FaultInjectingEnv::fail_writes, py::arg("err") = 5, py::arg("after") = 0,
           py::arg("count") = -1, "After `after` more good write requests, fail the next `count` (-1: all) with -err.")
      .def("fail_reads", &flexkv::FaultInjectingEnv::fail_reads, py::arg("err") = 5, py::arg("after") = 0,
           py::arg("count") = -1)
      .def("tear_writes", &flexkv::FaultInjectingEnv::tear_writes, py::arg("count") = 1,
           "The next `count` writes report success but only their first half reaches the file.")
      .def("fail_open", &flexkv::FaultInjectingEnv::fail_open, py::arg("err"))
      .def("clear", &flexkv::FaultInjectingEnv::clear);
}
