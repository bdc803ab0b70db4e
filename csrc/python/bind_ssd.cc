// flexkv._core.SsdStore: the SSD block store (ssd_store.h) for Python. Arrays
// cross as numpy arrays without forcecast; every call that does I/O releases
// the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "transfer/io_env.h"
#include "transfer/ssd_store.h"

namespace py = pybind11;

namespace {

using KeyArray = py::array_t<uint64_t, py::array::c_style>;
using I64Array = py::array_t<int64_t, py::array::c_style>;
using I32Array = py::array_t<int32_t, py::array::c_style>;
using U64Array = py::array_t<uint64_t, py::array::c_style>;

static_assert(sizeof(flexkv::BlockKey) == 16, "BlockKey must be two packed uint64");
static_assert(sizeof(flexkv::SsdStatus) == sizeof(int32_t), "SsdStatus must be an int32");

struct PySsdStore {
  std::shared_ptr<flexkv::FaultInjectingEnv> fault;  // set with fault_injection=True
  std::string fallback_reason;
  std::unique_ptr<flexkv::SsdStore> store;
  uint32_t tokens_per_block = 0;
};

std::unique_ptr<PySsdStore> make_store(std::vector<std::string> dirs, int64_t num_blocks, uint64_t block_bytes,
                                       uint32_t tokens_per_block, std::string fingerprint,
                                       const std::string& io_engine, unsigned queue_depth, int threads,
                                       uint64_t max_file_bytes, bool fault_injection) {
  if (queue_depth < 1) throw py::value_error("queue_depth must be at least 1");
  if (threads < 1) throw py::value_error("threads must be at least 1");
  if (io_engine != "auto" && io_engine != "io_uring" && io_engine != "threads") {
    throw py::value_error("io_engine must be 'auto', 'io_uring' or 'threads', got '" + io_engine + "'");
  }
  auto out = std::make_unique<PySsdStore>();
  out->tokens_per_block = tokens_per_block;
  flexkv::SsdStoreOptions opt;
  opt.dirs = std::move(dirs);
  opt.num_blocks = num_blocks;
  opt.block_bytes = block_bytes;
  opt.tokens_per_block = tokens_per_block;
  opt.fingerprint = std::move(fingerprint);
  opt.max_file_bytes = max_file_bytes;
  py::gil_scoped_release nogil;  // preallocating the files can take a while
  std::unique_ptr<flexkv::IoEnv> env;
  if (io_engine == "io_uring") {
    env = flexkv::make_uring_env(queue_depth);
  } else if (io_engine == "threads") {
    env = flexkv::make_thread_env(threads);
  } else {
    env = flexkv::make_default_env(queue_depth, threads, &out->fallback_reason);
  }
  std::shared_ptr<flexkv::IoEnv> used;
  if (fault_injection) {
    out->fault = std::make_shared<flexkv::FaultInjectingEnv>(std::move(env));
    used = out->fault;
  } else {
    used = std::move(env);
  }
  out->store = std::make_unique<flexkv::SsdStore>(std::move(opt), std::move(used));
  return out;
}

// The blocks of a write or read call, checked against each other and the store's geometry.
std::vector<flexkv::SsdBlock> blocks_of(const PySsdStore& s, const I32Array& slots, const KeyArray& keys,
                                        const KeyArray& parents, const I64Array& positions, const I64Array& tokens,
                                        const U64Array& payloads) {
  if (slots.ndim() != 1) throw py::value_error("slots must be a 1-D int32 array");
  const py::ssize_t n = slots.shape(0);
  const std::string nstr = std::to_string(n);
  if (keys.ndim() != 2 || keys.shape(0) != n || keys.shape(1) != 2) {
    throw py::value_error("keys must be a (" + nstr + ", 2) uint64 array");
  }
  if (parents.ndim() != 2 || parents.shape(0) != n || parents.shape(1) != 2) {
    throw py::value_error("parents must be a (" + nstr + ", 2) uint64 array");
  }
  if (positions.ndim() != 1 || positions.shape(0) != n) throw py::value_error("positions must be an int64[" + nstr + "] array");
  if (tokens.ndim() != 2 || tokens.shape(0) != n || tokens.shape(1) != static_cast<py::ssize_t>(s.tokens_per_block)) {
    throw py::value_error("tokens must be a (" + nstr + ", " + std::to_string(s.tokens_per_block) +
                          ") int64 array (one row of tokens_per_block ids per block)");
  }
  if (payloads.ndim() != 1 || payloads.shape(0) != n) {
    throw py::value_error("payloads must be a uint64[" + nstr + "] array of host block addresses");
  }
  const auto* k = reinterpret_cast<const flexkv::BlockKey*>(keys.data());
  const auto* p = reinterpret_cast<const flexkv::BlockKey*>(parents.data());
  std::vector<flexkv::SsdBlock> blocks(static_cast<size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    blocks[i] = flexkv::SsdBlock{slots.data()[i], k[i], p[i], positions.data()[i],
                                 tokens.data() + i * static_cast<py::ssize_t>(s.tokens_per_block),
                                 reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(payloads.data()[i]))};
  }
  return blocks;
}

using IoFn = void (flexkv::SsdStore::*)(const flexkv::SsdBlock*, size_t, flexkv::SsdStatus*);

I32Array do_io(PySsdStore& s, IoFn fn, const I32Array& slots, const KeyArray& keys, const KeyArray& parents,
               const I64Array& positions, const I64Array& tokens, const U64Array& payloads) {
  std::vector<flexkv::SsdBlock> blocks = blocks_of(s, slots, keys, parents, positions, tokens, payloads);
  I32Array status(static_cast<py::ssize_t>(blocks.size()));
  auto* st = reinterpret_cast<flexkv::SsdStatus*>(status.mutable_data());
  {
    py::gil_scoped_release nogil;
    ((*s.store).*fn)(blocks.data(), blocks.size(), st);
  }
  return status;
}

}  // namespace

void bind_ssd(py::module_& m) {
  py::class_<PySsdStore>(m, "SsdStore", "Whole host blocks in slots of preallocated O_DIRECT files, verified on read.")
      .def(py::init(&make_store), py::arg("dirs"), py::arg("num_blocks"), py::arg("block_bytes"),
           py::arg("tokens_per_block"), py::arg("fingerprint"), py::arg("io_engine") = "auto",
           py::arg("queue_depth") = 512, py::arg("threads") = 4, py::arg("max_file_bytes") = 0,
           py::arg("fault_injection") = false)
      .def_property_readonly("io_engine", [](const PySsdStore& s) { return s.store->io_env_name(); })
      .def_property_readonly("fallback_reason", [](const PySsdStore& s) { return s.fallback_reason; },
                             "Why io_engine='auto' fell back to threads (empty if it did not).")
      .def_property_readonly("slot_bytes", [](const PySsdStore& s) { return s.store->slot_bytes(); })
      .def("foreign_subdirs", [](const PySsdStore& s) { return s.store->foreign_subdirs(); },
           "flexkv-* subdirectories written for another fingerprint (ignored, never touched).")
      .def("write", [](PySsdStore& s, const I32Array& slots, const KeyArray& keys, const KeyArray& parents,
                       const I64Array& positions, const I64Array& tokens, const U64Array& payloads) {
        return do_io(s, &flexkv::SsdStore::write, slots, keys, parents, positions, tokens, payloads);
      }, py::arg("slots"), py::arg("keys"), py::arg("parents"), py::arg("positions"), py::arg("tokens"),
         py::arg("payloads"), "Writes blocks; int32 status per block: 0 ok, 2 I/O error.")
      .def("read", [](PySsdStore& s, const I32Array& slots, const KeyArray& keys, const KeyArray& parents,
                      const I64Array& positions, const I64Array& tokens, const U64Array& payloads) {
        return do_io(s, &flexkv::SsdStore::read, slots, keys, parents, positions, tokens, payloads);
      }, py::arg("slots"), py::arg("keys"), py::arg("parents"), py::arg("positions"), py::arg("tokens"),
         py::arg("payloads"), "Reads and verifies blocks; int32 status per block: 0 ok, 1 mismatch, 2 I/O error.")
      .def("scan", [](PySsdStore& s, int64_t limit) {
        std::vector<flexkv::SsdEntry> found;
        {
          py::gil_scoped_release nogil;
          found = s.store->scan(limit);
        }
        const auto m = static_cast<py::ssize_t>(found.size());
        I32Array slots(m);
        KeyArray keys({m, py::ssize_t{2}});
        KeyArray parents({m, py::ssize_t{2}});
        I64Array positions(m);
        int32_t* sl = slots.mutable_data();
        uint64_t* k = keys.mutable_data();
        uint64_t* p = parents.mutable_data();
        int64_t* pos = positions.mutable_data();
        for (py::ssize_t i = 0; i < m; ++i) {
          const flexkv::SsdEntry& e = found[static_cast<size_t>(i)];
          sl[i] = e.slot;
          k[2 * i] = e.key.lo;
          k[2 * i + 1] = e.key.hi;
          p[2 * i] = e.parent.lo;
          p[2 * i + 1] = e.parent.hi;
          pos[i] = e.position;
        }
        return py::make_tuple(slots, keys, parents, positions);
      }, py::arg("limit") = -1,
         "(slots int32[m], keys uint64[m,2], parents uint64[m,2], positions int64[m]) of the intact headers "
         "among slots 0..limit-1 (all slots when limit < 0).")
      .def("invalidate", [](PySsdStore& s, const I32Array& slots) {
        if (slots.ndim() != 1) throw py::value_error("slots must be a 1-D int32 array");
        py::gil_scoped_release nogil;
        s.store->invalidate(slots.data(), static_cast<size_t>(slots.shape(0)));
      }, py::arg("slots"))
      .def("inject", [](PySsdStore& s, const std::string& kind, int err, int64_t after, int64_t count) {
        if (!s.fault) throw std::runtime_error("SsdStore.inject needs a store created with fault_injection=True");
        if (kind == "fail_writes") {
          s.fault->fail_writes(err, after, count);
        } else if (kind == "fail_reads") {
          s.fault->fail_reads(err, after, count);
        } else if (kind == "tear_writes") {
          s.fault->tear_writes(count);
        } else if (kind == "fail_open") {
          s.fault->fail_open(err);
        } else if (kind == "clear") {
          s.fault->clear();
        } else {
          throw py::value_error("inject kind must be 'fail_writes', 'fail_reads', 'tear_writes', 'fail_open' or "
                                "'clear', got '" + kind + "'");
        }
      }, py::arg("kind"), py::arg("err") = 5, py::arg("after") = 0, py::arg("count") = -1,
         "Fault injection (fault_injection=True only): fail or tear the next requests. The store opens its files "
         "when it is created, so 'fail_open' affects no file of an existing store.");
}
