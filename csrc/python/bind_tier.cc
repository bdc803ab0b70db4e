// flexkv._core's CPU tier: the tier on its own (CpuTier, for tests and tools),
// the tier info dict that KVManager.tier_info() hands to worker processes, and
// map_cpu_tier(), with which a worker maps the tier from that dict.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "control/cpu_tier.h"
#include "pool/memfd_region.h"
#include "pool/region_share.h"

namespace py = pybind11;

namespace {

// A uint8 array over [data, data + size) that holds `mapping` (so it stays valid after the owner closes).
py::array_t<uint8_t> view_of(std::shared_ptr<const void> mapping, uint8_t* data, size_t size) {
  auto* hold = new std::shared_ptr<const void>(std::move(mapping));
  py::capsule owner(hold, [](void* p) { delete static_cast<std::shared_ptr<const void>*>(p); });
  return py::array_t<uint8_t>({static_cast<py::ssize_t>(size)}, {py::ssize_t{1}}, data, owner);
}

flexkv::TierInfo tier_info_of(const py::dict& d) {
  if (!d.contains("socket")) {
    throw py::value_error(d.contains("shm_name")
                              ? "tier_info names a /dev/shm segment ('shm_name'): it comes from an older FlexKV; "
                                "run the scheduler and the workers with the same FlexKV version"
                              : "tier_info lacks 'socket': pass KVManager.tier_info() unchanged");
  }
  flexkv::TierInfo t;
  try {
    t.socket = d["socket"].cast<std::string>();
    t.num_blocks = d["num_blocks"].cast<int64_t>();
    t.block_stride = d["block_stride"].cast<uint64_t>();
    t.block_bytes = d["block_bytes"].cast<uint64_t>();
    t.size = d["size"].cast<uint64_t>();
  } catch (const py::error_already_set&) {
    throw py::value_error("tier_info needs 'socket' (str) and 'num_blocks', 'block_stride', 'block_bytes', 'size' "
                          "(ints): pass KVManager.tier_info() unchanged");
  } catch (const py::cast_error&) {
    throw py::value_error("tier_info needs 'socket' (str) and 'num_blocks', 'block_stride', 'block_bytes', 'size' "
                          "(ints): pass KVManager.tier_info() unchanged");
  }
  return t;
}

}  // namespace

py::dict tier_info_dict(const flexkv::TierInfo& t) {
  py::dict d;
  d["socket"] = t.socket;
  d["num_blocks"] = t.num_blocks;
  d["block_stride"] = t.block_stride;
  d["block_bytes"] = t.block_bytes;
  d["size"] = t.size;
  return d;
}

void bind_tier(py::module_& m) {
  py::class_<flexkv::CpuTier>(m, "CpuTier", "Host blocks in anonymous shared memory (memfd), with their index.")
      .def(py::init<int64_t, uint64_t, uint64_t, double, bool>(), py::arg("num_blocks"), py::arg("block_bytes"),
           py::arg("block_align") = 1, py::arg("evict_ratio") = 0.0, py::arg("huge_pages") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("tier_info", [](const flexkv::CpuTier& t) { return tier_info_dict(t.info()); },
           "What another process needs to map the tier (map_cpu_tier).")
      .def_property_readonly("num_blocks", &flexkv::CpuTier::num_blocks)
      .def_property_readonly("block_bytes", &flexkv::CpuTier::block_bytes)
      .def_property_readonly("block_stride", &flexkv::CpuTier::block_stride)
      .def_property_readonly("base", &flexkv::CpuTier::base)
      .def_property_readonly("hugetlb", &flexkv::CpuTier::hugetlb)
      .def_property_readonly("served", &flexkv::CpuTier::served)
      .def_property_readonly("refused", &flexkv::CpuTier::refused)
      .def("close", &flexkv::CpuTier::close, py::call_guard<py::gil_scoped_release>())
      .def("as_array", [](const flexkv::CpuTier& t) {
        if (t.base() == 0) throw py::value_error("the CPU tier is closed");
        return view_of(t.mapping(), t.block(0), t.size());
      }, "A uint8 view of the tier's blocks, valid as long as the array lives.");

  py::class_<flexkv::MemfdRegion>(m, "SharedRegion", "The CPU tier's memory as another process maps it.")
      .def_property_readonly("size", &flexkv::MemfdRegion::size)
      .def_property_readonly("address", [](const flexkv::MemfdRegion& r) {
        return reinterpret_cast<uintptr_t>(r.data());
      })
      .def("close", &flexkv::MemfdRegion::close, "Drops this hold on the mapping (arrays keep theirs).")
      .def("as_array", [](const flexkv::MemfdRegion& r) {
        if (r.data() == nullptr) throw py::value_error("the shared region is closed");
        return view_of(r.mapping(), r.data(), r.size());
      }, "A uint8 view of the whole region, valid as long as the array lives.");

  m.def("map_cpu_tier", [](const py::dict& tier_info, double timeout_s) {
    const flexkv::TierInfo t = tier_info_of(tier_info);
    py::gil_scoped_release nogil;
    try {
      return flexkv::map_shared_region(t.socket, t.geometry(), timeout_s);
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(std::string("cannot map FlexKV's CPU tier: ") + e.what());
    }
  }, py::arg("tier_info"), py::arg("timeout_s") = 10.0,
        "Maps the CPU tier that tier_info (KVManager.tier_info()) describes: receives its memory from the owning "
        "process over its socket, checks the geometry, maps it. The region keeps the mapping.");
}
