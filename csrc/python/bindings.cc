// flexkv._core: the Python face of the C++ core. Arrays cross as numpy arrays;
// copies and waits release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <string>

#include "index/block_key.h"
#include "index/radix_index.h"
#include "array_args.h"

namespace py = pybind11;
void bind_ssd(py::module_& m);  // bind_ssd.cc
void bind_copy_engines(py::module_& m);  // bind_copy_engines.cc
void bind_control(py::module_& m);  // bind_control.cc
void bind_support(py::module_& m);  // bind_support.cc
void bind_config(py::module_& m);  // bind_config.cc
void bind_cache(py::module_& m);  // bind_cache.cc
void bind_tier(py::module_& m);  // bind_tier.cc
using flexkv::BlockKey;
using flexkv::python::check_1d;
using flexkv::python::I32Array;
using flexkv::python::I64Array;

namespace {

using KeyArray = py::array_t<uint64_t, py::array::c_style>;

const BlockKey* keys_of(const KeyArray& a, size_t* n) {
  if (a.ndim() != 2 || a.shape(1) != 2) throw py::value_error("block keys must be a (n, 2) uint64 array");
  *n = static_cast<size_t>(a.shape(0));
  static_assert(sizeof(BlockKey) == 16, "BlockKey must be two packed uint64");
  return reinterpret_cast<const BlockKey*>(a.data());
}

KeyArray make_keys(size_t n) { return KeyArray({static_cast<py::ssize_t>(n), py::ssize_t{2}}); }

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "FlexKV C++ core: block keys, radix index, host copy engine, shared memory";
  bind_support(m);
  bind_tier(m);
  bind_ssd(m);
  bind_copy_engines(m);
  bind_control(m);
  bind_config(m);
  bind_cache(m);

  m.def("namespace_key", [](const std::string& ns) {
    BlockKey k = flexkv::namespace_key(ns);
    KeyArray out(py::ssize_t{2});
    out.mutable_at(0) = k.lo;
    out.mutable_at(1) = k.hi;
    return out;
  }, py::arg("namespace"), "The 128-bit seed of the key chains of a namespace, as a uint64[2] array.");

  m.def("chain_block_keys", [](const KeyArray& seed, const I64Array& tokens, size_t tokens_per_block) {
    if (seed.ndim() != 1 || seed.shape(0) != 2) throw py::value_error("seed must be a uint64[2] array");
    check_1d(tokens, "token_ids");
    if (tokens_per_block == 0) throw py::value_error("tokens_per_block must be positive");
    const size_t n_tokens = static_cast<size_t>(tokens.shape(0));
    KeyArray out = make_keys(n_tokens / tokens_per_block);
    BlockKey s{seed.at(0), seed.at(1)};
    {
      py::gil_scoped_release nogil;
      flexkv::chain_block_keys(s, tokens.data(), n_tokens, tokens_per_block,
                               reinterpret_cast<BlockKey*>(out.mutable_data()));
    }
    return out;
  }, py::arg("seed"), py::arg("token_ids"), py::arg("tokens_per_block"),
     "Keys of the whole blocks of token_ids, chained from seed, as a (n, 2) uint64 array.");

  py::class_<flexkv::RadixIndex>(m, "RadixIndex")
      .def(py::init<int32_t, double>(), py::arg("num_blocks"), py::arg("evict_ratio") = 0.0)
      .def_property_readonly("capacity", &flexkv::RadixIndex::capacity)
      .def("match", [](const flexkv::RadixIndex& self, const KeyArray& keys) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        return self.match(k, n);
      }, py::arg("keys"))
      .def("acquire", [](flexkv::RadixIndex& self, const KeyArray& keys, size_t start) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        I32Array ids(static_cast<py::ssize_t>(n > start ? n - start : 0));
        size_t got = self.acquire(k, n, start, ids.mutable_data());
        ids.resize({static_cast<py::ssize_t>(got > start ? got - start : 0)});
        return py::make_tuple(got, ids);
      }, py::arg("keys"), py::arg("start") = 0,
         "(number of leading ready keys, ids of those at positions >= start, now locked)")
      .def("reserve", [](flexkv::RadixIndex& self, const KeyArray& keys, size_t start) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        I32Array ids(static_cast<py::ssize_t>(n));
        py::array_t<bool> is_new(static_cast<py::ssize_t>(n));
        static_assert(sizeof(bool) == sizeof(uint8_t), "bool must be one byte");
        size_t got =
            self.reserve(k, n, start, ids.mutable_data(), reinterpret_cast<uint8_t*>(is_new.mutable_data()));
        ids.resize({static_cast<py::ssize_t>(got)});
        is_new.resize({static_cast<py::ssize_t>(got)});
        return py::make_tuple(ids, is_new);
      }, py::arg("keys"), py::arg("start") = 0)
      .def("contains_each", [](const flexkv::RadixIndex& self, const KeyArray& keys) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        py::array_t<bool> ready(static_cast<py::ssize_t>(n));
        self.contains_each(k, n, reinterpret_cast<uint8_t*>(ready.mutable_data()));
        return ready;
      }, py::arg("keys"), "Per entry key (a chain of one block): whether it has a ready block.")
      .def("acquire_each", [](flexkv::RadixIndex& self, const KeyArray& keys) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        I32Array ids(static_cast<py::ssize_t>(n));
        const size_t got = self.acquire_each(k, n, ids.mutable_data());
        ids.resize({static_cast<py::ssize_t>(got)});
        return ids;
      }, py::arg("keys"), "Locks the leading ready entries; returns their ids.")
      .def("reserve_each", [](flexkv::RadixIndex& self, const KeyArray& keys) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n);
        I32Array ids(static_cast<py::ssize_t>(n));
        py::array_t<bool> is_new(static_cast<py::ssize_t>(n));
        const size_t got =
            self.reserve_each(k, n, ids.mutable_data(), reinterpret_cast<uint8_t*>(is_new.mutable_data()));
        ids.resize({static_cast<py::ssize_t>(got)});
        is_new.resize({static_cast<py::ssize_t>(got)});
        return py::make_tuple(ids, is_new);
      }, py::arg("keys"), "reserve() per entry, in order; (ids, is_new) of the entries handled.")
      .def("commit", [](flexkv::RadixIndex& self, const I32Array& ids) {
        check_1d(ids, "ids");
        self.commit(ids.data(), static_cast<size_t>(ids.shape(0)));
      }, py::arg("ids"))
      .def("release", [](flexkv::RadixIndex& self, const I32Array& ids) {
        check_1d(ids, "ids");
        self.release(ids.data(), static_cast<size_t>(ids.shape(0)));
      }, py::arg("ids"))
      .def("set_ready", [](flexkv::RadixIndex& self, const I32Array& ids, bool ready) {
        check_1d(ids, "ids");
        self.set_ready(ids.data(), static_cast<size_t>(ids.shape(0)), ready);
      }, py::arg("ids"), py::arg("ready"))
      .def("restore", [](flexkv::RadixIndex& self, const KeyArray& keys, const KeyArray& parents,
                         const I64Array& positions, const I32Array& ids) {
        size_t n, np_;
        const BlockKey* k = keys_of(keys, &n);
        const BlockKey* p = keys_of(parents, &np_);
        check_1d(positions, "positions");
        check_1d(ids, "ids");
        if (np_ != n || static_cast<size_t>(positions.shape(0)) != n || static_cast<size_t>(ids.shape(0)) != n) {
          throw py::value_error("restore: keys, parents, positions and ids must have the same length");
        }
        std::vector<int32_t> left_out;
        size_t restored;
        {
          py::gil_scoped_release nogil;
          restored = self.restore(k, p, positions.data(), ids.data(), n, &left_out);
        }
        I32Array out(static_cast<py::ssize_t>(left_out.size()));
        std::copy(left_out.begin(), left_out.end(), out.mutable_data());
        return py::make_tuple(restored, out);
      }, py::arg("keys"), py::arg("parents"), py::arg("positions"), py::arg("ids"),
         "Rebuilds an empty index from stored blocks; returns (blocks restored, ids left out).")
      .def("evict", &flexkv::RadixIndex::evict, py::arg("num_blocks"))
      .def("reset", &flexkv::RadixIndex::reset)
      .def("is_ready", &flexkv::RadixIndex::is_ready, py::arg("block_id"))
      .def("lock_count", &flexkv::RadixIndex::lock_count, py::arg("block_id"))
      .def("check_consistency", &flexkv::RadixIndex::check_consistency)
      .def("stats", [](const flexkv::RadixIndex& self) {
        flexkv::RadixIndexStats s = self.stats();
        py::dict d;
        d["capacity"] = s.capacity;
        d["num_free"] = s.num_free;
        d["num_cached"] = s.num_cached;
        d["num_locked"] = s.num_locked;
        d["num_nodes"] = s.num_nodes;
        d["evicted"] = s.evicted;
        return d;
      });
}
