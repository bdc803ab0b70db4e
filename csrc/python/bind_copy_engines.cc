// flexkv._core's copy engines: HostCopyEngine and GpuCopyEngine, two Python
// classes over the one CopyEngine interface (transfer/copy_engine.h) with the
// same methods, plus the CUDA queries and a plain memcpy (the ceiling the host
// engine is measured against). In a build without CUDA, GpuCopyEngine exists
// and its constructor says how to get CUDA support.
//
// Every call that can block (a wait, a registration that pins memory, a submit
// of the GPU engine, closing an engine) releases the GIL; the host engine's
// submit, which cannot, keeps it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "array_args.h"
#include "transfer/copy_engine.h"

namespace py = pybind11;
using flexkv::CopyEngine;
using flexkv::python::I64Array;

namespace {

// A Python object's hold on an engine. Calls take a reference first, so close()
// (or the object going away) while another thread is inside a call destroys
// the engine only once that call has returned.
struct EngineHandle {
  std::shared_ptr<CopyEngine> engine;

  explicit EngineHandle(std::unique_ptr<CopyEngine> e) : engine(std::move(e)) {}
  virtual ~EngineHandle() {
    if (engine != nullptr && PyGILState_Check()) {
      py::gil_scoped_release nogil;  // the engine's destructor waits for its jobs
      engine.reset();
    }
  }
  std::shared_ptr<CopyEngine> get() const {
    if (engine == nullptr) throw std::runtime_error("this copy engine is closed");
    return engine;
  }
  void close() {
    std::shared_ptr<CopyEngine> e = std::move(engine);
    py::gil_scoped_release nogil;
    e.reset();
  }
};

struct HostEngineHandle : EngineHandle {
  int num_threads;
  explicit HostEngineHandle(int threads) : EngineHandle(flexkv::make_host_copy_engine(threads)), num_threads(threads) {}
};

struct GpuEngineHandle : EngineHandle {
  explicit GpuEngineHandle(const flexkv::GpuCopyOptions& o) : EngineHandle(flexkv::make_gpu_copy_engine(o)) {}
};

flexkv::GpuCopyPath path_of(const std::string& p, const char* what) {
  if (p == "kernel") return flexkv::GpuCopyPath::kKernel;
  if (p == "copy_engine") return flexkv::GpuCopyPath::kCopyEngine;
  if (p == "memcpy_per_chunk") return flexkv::GpuCopyPath::kMemcpyPerChunk;
  if (p == "staged") return flexkv::GpuCopyPath::kStaged;
  throw py::value_error(std::string(what) + " must be 'staged', 'kernel', 'copy_engine' or 'memcpy_per_chunk', got '" + p + "'");
}

int32_t register_layout(const EngineHandle& h, const I64Array& segments, int64_t engine_num_blocks,
                        uint64_t host_base, uint64_t host_block_bytes, int64_t host_num_blocks) {
  const flexkv::EngineLayout layout = flexkv::python::layout_of(segments, engine_num_blocks);
  const flexkv::HostRegion host{host_base, host_block_bytes, host_num_blocks};
  auto e = h.get();
  py::gil_scoped_release nogil;
  return e->register_layout(layout, host);
}

uint64_t submit(const EngineHandle& h, const std::string& direction, int32_t layout_id,
                const I64Array& engine_blocks, const I64Array& host_blocks, bool urgent, bool layerwise,
                uint64_t tag) {
  const flexkv::CopyDirection dir = flexkv::python::direction_of(direction);
  const size_t n = flexkv::python::block_pairs(engine_blocks, host_blocks);
  auto e = h.get();
  if (e->device() < 0) {
    // The host engine's submit never blocks (it copies the block lists and queues them under a short
    // mutex, or copies a job of at most 1 MiB itself, in tens of microseconds). Releasing the GIL here would
    // let another Python thread, such as a completion collector, take it and keep the caller waiting up to
    // a switch interval (5 ms).
    return e->submit(dir, layout_id, engine_blocks.data(), host_blocks.data(), n, urgent, layerwise, tag);
  }
  py::gil_scoped_release nogil;  // CUDA calls can block while the device's queues are full
  return e->submit(dir, layout_id, engine_blocks.data(), host_blocks.data(), n, urgent, layerwise, tag);
}

bool wait(const EngineHandle& h, uint64_t job, int64_t timeout_us) {
  auto e = h.get();
  std::string error;
  bool done;
  {
    py::gil_scoped_release nogil;
    done = e->wait(job, timeout_us, &error);
  }
  if (done && !error.empty()) throw std::runtime_error("copy job " + std::to_string(job) + " failed: " + error);
  return done;
}

std::optional<py::tuple> next_completion(const EngineHandle& h, int64_t timeout_us) {
  auto e = h.get();
  std::optional<flexkv::CopyCompletion> c;
  if (timeout_us == 0) {
    // A poll takes a short lock and never waits: releasing the GIL for it would let another Python thread
    // take it and keep the caller (an engine's step) waiting up to a switch interval.
    c = e->next_completion(0);
  } else {
    py::gil_scoped_release nogil;
    c = e->next_completion(timeout_us);
  }
  if (!c) return std::nullopt;
  return py::make_tuple(c->job, c->tag, c->error);
}

}  // namespace

void bind_copy_engines(py::module_& m) {
  m.attr("CUDA_BUILT") = flexkv::cuda_built();
  m.def("cuda_available", &flexkv::cuda_available, "True when this build has CUDA and a CUDA device is usable.");
  m.def("cuda_device_count", &flexkv::cuda_device_count);
  m.def("memcpy", [](uintptr_t dst, uintptr_t src, size_t n) {
    py::gil_scoped_release nogil;
    std::memcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n);
  }, py::arg("dst"), py::arg("src"), py::arg("nbytes"),
     "One plain memcpy: the ceiling the copy engine is measured against.");

  py::class_<EngineHandle>(m, "CopyEngine",
                           "What HostCopyEngine and GpuCopyEngine share: register the host tier and a layout once, "
                           "submit jobs by layout id, collect each job once (wait or next_completion).")
      .def("register_host", [](const EngineHandle& h, uint64_t base, uint64_t nbytes) {
        auto e = h.get();
        py::gil_scoped_release nogil;
        e->register_host(base, nbytes);
      }, py::arg("base"), py::arg("nbytes"), "Registers (the GPU engine: pins) a host range every layout lies in.")
      .def("unregister_host", [](const EngineHandle& h, uint64_t base) {
        auto e = h.get();
        py::gil_scoped_release nogil;
        e->unregister_host(base);
      }, py::arg("base"), "Forgets the layouts on the range, waits for the jobs in flight, unpins it.")
      .def("register_layout", &register_layout, py::arg("segments"), py::arg("engine_num_blocks"),
           py::arg("host_base"), py::arg("host_block_bytes"), py::arg("host_num_blocks"),
           "Checks a layout once ((n, 4) or (n, 5) int64 segments [engine_base, engine_block_stride, host_offset, "
           "bytes(, group)]) and returns its id.")
      .def("unregister_layout", [](const EngineHandle& h, int32_t id) { h.get()->unregister_layout(id); },
           py::arg("layout_id"))
      .def("submit", &submit, py::arg("direction"), py::arg("layout_id"), py::arg("engine_blocks"),
           py::arg("host_blocks"), py::arg("urgent") = false, py::arg("layerwise") = false, py::arg("tag") = 0,
           "Queues a copy of engine_blocks[i] <-> host_blocks[i] ('host_to_engine' or 'engine_to_host'); returns "
           "the job id. A bad block id (IndexError) or layout id (ValueError) queues nothing.")
      .def("wait", &wait, py::arg("job"), py::arg("timeout_us") = -1,
           "True once the job has finished (it is then collected), False on timeout; raises RuntimeError naming the "
           "error of a job that failed (collected too).")
      .def("next_completion", &next_completion, py::arg("timeout_us") = -1,
           "The next finished job not yet collected, in completion order, as (job, tag, error): error is '' on "
           "success. None on timeout or while interrupted.")
      .def("interrupt", [](const EngineHandle& h) { h.get()->interrupt(); },
           "next_completion returns None at once until resume().")
      .def("resume", [](const EngineHandle& h) { h.get()->resume(); })
      .def_property_readonly("in_flight", [](const EngineHandle& h) { return h.get()->in_flight(); },
                             "Jobs submitted and not yet finished.")
      .def("wait_group", [](const EngineHandle& h, uint64_t job, int32_t group) {
        auto e = h.get();
        py::gil_scoped_release nogil;
        e->wait_group(job, group);
      }, py::arg("job"), py::arg("group"), "Blocks until a segment group (a layer) of the job has been copied.")
      .def("stream_wait_group", [](const EngineHandle& h, uint64_t job, int32_t group, uintptr_t stream) {
        auto e = h.get();
        py::gil_scoped_release nogil;
        e->stream_wait_group(job, group, reinterpret_cast<void*>(stream));
      }, py::arg("job"), py::arg("group"), py::arg("stream"),
         "Makes a cudaStream_t (an int, e.g. torch.cuda.Stream.cuda_stream) wait for a group of a job.")
      .def_property_readonly("name", [](const EngineHandle& h) { return h.get()->name(); })
      .def_property_readonly("device", [](const EngineHandle& h) { return h.get()->device(); })
      .def("close", &EngineHandle::close,
           "Waits for the jobs in flight and releases the engine (the GPU engine unpins what it pinned).");

  py::class_<HostEngineHandle, EngineHandle>(m, "HostCopyEngine",
                                             "Copies between KV memory in host RAM and the host tier.")
      .def(py::init<int>(), py::arg("num_threads"))
      .def_readonly("num_threads", &HostEngineHandle::num_threads)
      .def("copy", [](const HostEngineHandle& h, const std::string& direction, const I64Array& segments,
                      int64_t engine_num_blocks, uint64_t host_base, uint64_t host_block_bytes, int64_t host_num_blocks,
                      const I64Array& engine_blocks, const I64Array& host_blocks) {
        const flexkv::CopyDirection dir = flexkv::python::direction_of(direction);
        const size_t n = flexkv::python::block_pairs(engine_blocks, host_blocks);
        const flexkv::EngineLayout layout = flexkv::python::layout_of(segments, engine_num_blocks);
        const flexkv::HostRegion host{host_base, host_block_bytes, host_num_blocks};
        auto e = h.get();
        py::gil_scoped_release nogil;
        e->register_host(host_base, host_block_bytes * static_cast<uint64_t>(host_num_blocks));
        const int32_t id = e->register_layout(layout, host);
        uint64_t job;
        try {
          job = e->submit(dir, id, engine_blocks.data(), host_blocks.data(), n, false, false, 0);
        } catch (...) {
          e->unregister_layout(id);
          throw;
        }
        e->unregister_layout(id);  // the job already queued still runs
        e->wait(job, -1);
      }, py::arg("direction"), py::arg("segments"), py::arg("engine_num_blocks"), py::arg("host_base"),
         py::arg("host_block_bytes"), py::arg("host_num_blocks"), py::arg("engine_blocks"), py::arg("host_blocks"),
         "One synchronous copy with a layout given in full, for callers that keep no layout id: it registers the "
         "host range (kept) and the layout (forgotten after the copy) on every call.");

  py::class_<GpuEngineHandle, EngineHandle>(m, "GpuCopyEngine",
                                            "Copies between KV memory on one CUDA device and the pinned host tier.")
      .def(py::init([](int device, const std::string& path_h2d, const std::string& path_d2h, int sms_h2d,
                       int sms_d2h, uint64_t stage_slot_bytes) {
             flexkv::GpuCopyOptions o;
             o.stage_slot_bytes = stage_slot_bytes;
             o.device = device;
             o.path_h2d = path_of(path_h2d, "path_h2d");
             o.path_d2h = path_of(path_d2h, "path_d2h");
             o.sms_h2d = sms_h2d;
             o.sms_d2h = sms_d2h;
             return new GpuEngineHandle(o);
           }),
           py::arg("device") = 0, py::arg("path_h2d") = "kernel", py::arg("path_d2h") = "kernel",
           py::arg("sms_h2d") = 8, py::arg("sms_d2h") = 8, py::arg("stage_slot_bytes") = uint64_t{8} << 20)
      .def_property_readonly("load_stream", [](const GpuEngineHandle& h) {
        return reinterpret_cast<uintptr_t>(h.get()->stream(flexkv::CopyDirection::kHostToEngine));
      }, "The cudaStream_t of loads and urgent jobs, as an int.")
      .def_property_readonly("store_stream", [](const GpuEngineHandle& h) {
        return reinterpret_cast<uintptr_t>(h.get()->stream(flexkv::CopyDirection::kEngineToHost));
      }, "The cudaStream_t of stores, as an int.");
}
