// flexkv._core's GPU data plane: GpuCopyEngine. In a build without CUDA the
// class exists and its constructor says how to get CUDA support.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "array_args.h"
#include "transfer/gpu_copy_engine.h"

namespace py = pybind11;
using flexkv::GpuCopyEngine;
using flexkv::GpuCopyPath;
using flexkv::python::copy_args;
using flexkv::python::CopyArgs;
using flexkv::python::I64Array;

namespace {

GpuCopyPath path_of(const std::string& p, const char* what) {
  if (p == "kernel") return GpuCopyPath::kKernel;
  if (p == "copy_engine") return GpuCopyPath::kCopyEngine;
  if (p == "memcpy_per_chunk") return GpuCopyPath::kMemcpyPerChunk;
  throw py::value_error(std::string(what) + " must be 'kernel', 'copy_engine' or 'memcpy_per_chunk', got '" + p + "'");
}

}  // namespace

void bind_gpu(py::module_& m) {
  m.attr("CUDA_BUILT") = flexkv::cuda_built();
  m.def("cuda_available", &flexkv::cuda_available, "True when this build has CUDA and a CUDA device is usable.");
  m.def("cuda_device_count", &flexkv::cuda_device_count);

  py::class_<GpuCopyEngine>(m, "GpuCopyEngine")
      .def(py::init([](int device, const std::string& path_h2d, const std::string& path_d2h, int sms_h2d,
                       int sms_d2h) {
             flexkv::GpuCopyOptions o;
             o.device = device;
             o.path_h2d = path_of(path_h2d, "path_h2d");
             o.path_d2h = path_of(path_d2h, "path_d2h");
             o.sms_h2d = sms_h2d;
             o.sms_d2h = sms_d2h;
             return new GpuCopyEngine(o);
           }),
           py::arg("device") = 0, py::arg("path_h2d") = "kernel", py::arg("path_d2h") = "kernel",
           py::arg("sms_h2d") = 8, py::arg("sms_d2h") = 8)
      .def("register_host", &GpuCopyEngine::register_host, py::arg("base"), py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("unregister_host", &GpuCopyEngine::unregister_host, py::arg("base"),
           py::call_guard<py::gil_scoped_release>())
      .def("check_layout", [](const GpuCopyEngine& self, const I64Array& segments, int64_t engine_num_blocks,
                              uint64_t host_base, uint64_t host_block_bytes, int64_t host_num_blocks) {
        self.check_device_layout(flexkv::python::layout_of(segments, engine_num_blocks),
                                 flexkv::HostRegion{host_base, host_block_bytes, host_num_blocks});
      }, py::arg("segments"), py::arg("engine_num_blocks"), py::arg("host_base"), py::arg("host_block_bytes"),
         py::arg("host_num_blocks"))
      .def("submit", [](GpuCopyEngine& self, const std::string& direction, const I64Array& segments,
                        int64_t engine_num_blocks, uint64_t host_base, uint64_t host_block_bytes,
                        int64_t host_num_blocks, const I64Array& engine_blocks, const I64Array& host_blocks,
                        bool urgent, bool layerwise) {
        CopyArgs a = copy_args(direction, segments, engine_num_blocks, host_base, host_block_bytes, host_num_blocks,
                               engine_blocks, host_blocks);
        py::gil_scoped_release nogil;
        return self.submit(a.dir, a.layout, a.host, a.engine_blocks.data(), a.host_blocks.data(),
                           flexkv::python::num_blocks_of(a), urgent, layerwise);
      }, py::arg("direction"), py::arg("segments"), py::arg("engine_num_blocks"), py::arg("host_base"),
         py::arg("host_block_bytes"), py::arg("host_num_blocks"), py::arg("engine_blocks"), py::arg("host_blocks"),
         py::arg("urgent") = false, py::arg("layerwise") = false)
      .def("wait", &GpuCopyEngine::wait, py::arg("job_id"), py::arg("timeout_us") = -1,
           py::call_guard<py::gil_scoped_release>())
      .def("wait_any", &GpuCopyEngine::wait_any, py::arg("timeout_us") = -1,
           py::call_guard<py::gil_scoped_release>())
      .def("done", &GpuCopyEngine::done, py::arg("job_id"))
      .def("take_error", &GpuCopyEngine::take_error, py::arg("job_id"))
      .def("wait_group", &GpuCopyEngine::wait_group, py::arg("job_id"), py::arg("group"),
           py::call_guard<py::gil_scoped_release>())
      .def("stream_wait_group", [](GpuCopyEngine& self, uint64_t job_id, int32_t group, uintptr_t stream) {
        self.stream_wait_group(job_id, group, reinterpret_cast<void*>(stream));
      }, py::arg("job_id"), py::arg("group"), py::arg("stream"),
         "Makes a cudaStream_t (an int, e.g. torch.cuda.Stream.cuda_stream) wait for a group of a job.")
      .def_property_readonly("load_stream", [](const GpuCopyEngine& s) {
        return reinterpret_cast<uintptr_t>(s.load_stream());
      })
      .def_property_readonly("store_stream", [](const GpuCopyEngine& s) {
        return reinterpret_cast<uintptr_t>(s.store_stream());
      });
}
