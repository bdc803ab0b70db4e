// flexkv._core.ControlPlane: the one cache every Python facade (KVManager,
// PageStore) drives. Arrays cross as numpy arrays without forcecast; every
// call that may wait, take the plane's locks or move bytes releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "control/control_plane.h"
#include "flexkv/errors.h"
#include "transfer/io_env.h"

namespace py = pybind11;
py::dict tier_info_dict(const flexkv::TierInfo& t);  // bind_tier.cc
using flexkv::BlockKey;
using flexkv::ControlPlane;
using flexkv::KeyRun;

namespace {

using KeyArray = py::array_t<uint64_t, py::array::c_style>;
using I64Array = py::array_t<int64_t, py::array::c_style>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

const BlockKey* keys_of(const KeyArray& a, size_t* n, const char* what) {
  if (a.ndim() != 2 || a.shape(1) != 2) throw py::value_error(std::string(what) + " must be a (n, 2) uint64 array");
  *n = static_cast<size_t>(a.shape(0));
  return reinterpret_cast<const BlockKey*>(a.data());
}

BlockKey seed_of(const KeyArray& a) {
  if (a.ndim() != 1 || a.shape(0) != 2) throw py::value_error("seed must be a uint64[2] array");
  return BlockKey{a.at(0), a.at(1)};
}

KeyArray keys_array(const BlockKey* keys, size_t n) {
  KeyArray out({static_cast<py::ssize_t>(n), py::ssize_t{2}});
  std::copy(keys, keys + n, reinterpret_cast<BlockKey*>(out.mutable_data()));
  return out;
}

template <typename T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

template <typename T>
T opt(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) && !d[key].is_none() ? d[key].cast<T>() : fallback;
}

flexkv::ControlPlaneOptions options_of(const py::dict& d) {
  flexkv::ControlPlaneOptions o;
  static const char* const kKnown[] = {
      "model_fingerprint", "block_bytes", "num_layers", "tokens_per_block", "num_cpu_blocks", "evict_ratio",
      "use_hugepage_cpu_buffer", "enable_ssd", "num_ssd_blocks", "ssd_cache_dirs", "ssd_cache_iouring_entries",
      "ssd_io_engine", "ssd_env", "use_ce_transfer_h2d", "use_ce_transfer_d2h", "transfer_sms_h2d",
      "transfer_sms_d2h", "num_copy_threads", "progress_interval_s"};
  for (auto item : d) {
    const std::string key = item.first.cast<std::string>();
    bool known = false;
    for (const char* k : kKnown) known = known || key == k;
    if (!known) throw py::value_error("ControlPlane: unknown option '" + key + "'");
  }
  o.model_fingerprint = d["model_fingerprint"].cast<std::string>();
  o.block_bytes = d["block_bytes"].cast<uint64_t>();
  o.num_layers = d["num_layers"].cast<int>();
  o.tokens_per_block = d["tokens_per_block"].cast<int>();
  o.num_cpu_blocks = d["num_cpu_blocks"].cast<int64_t>();
  o.evict_ratio = opt<double>(d, "evict_ratio", 0.0);
  o.use_hugepage_cpu_buffer = opt<bool>(d, "use_hugepage_cpu_buffer", false);
  o.enable_ssd = opt<bool>(d, "enable_ssd", false);
  o.num_ssd_blocks = opt<int64_t>(d, "num_ssd_blocks", 0);
  o.ssd_cache_dirs = opt<std::vector<std::string>>(d, "ssd_cache_dirs", {});
  o.ssd_cache_iouring_entries = opt<unsigned>(d, "ssd_cache_iouring_entries", 512);
  o.ssd_io_engine = opt<std::string>(d, "ssd_io_engine", "auto");
  if (d.contains("ssd_env") && !d["ssd_env"].is_none()) o.ssd_env = d["ssd_env"].cast<std::shared_ptr<flexkv::FaultInjectingEnv>>();
  o.use_ce_transfer_h2d = opt<bool>(d, "use_ce_transfer_h2d", false);
  o.use_ce_transfer_d2h = opt<bool>(d, "use_ce_transfer_d2h", false);
  o.transfer_sms_h2d = opt<int>(d, "transfer_sms_h2d", 8);
  o.transfer_sms_d2h = opt<int>(d, "transfer_sms_d2h", 8);
  o.num_copy_threads = opt<int>(d, "num_copy_threads", 2);
  o.progress_interval_s = opt<double>(d, "progress_interval_s", 2.0);
  return o;
}

py::dict index_dict(const flexkv::RadixIndexStats& s) {
  py::dict d;
  d["capacity"] = s.capacity;
  d["num_free"] = s.num_free;
  d["num_cached"] = s.num_cached;
  d["num_locked"] = s.num_locked;
  d["num_nodes"] = s.num_nodes;
  d["evicted"] = s.evicted;
  return d;
}

py::list reports_list(const std::vector<flexkv::Report>& reports) {
  py::list out;
  for (const auto& r : reports) {
    out.append(py::make_tuple(static_cast<int64_t>(r.task), r.status, r.seq_len, to_array(r.blocks), r.error));
  }
  return out;
}

std::vector<flexkv::TaskId> ids_of(const std::vector<int64_t>& ids) {
  return std::vector<flexkv::TaskId>(ids.begin(), ids.end());
}

}  // namespace

void bind_control(py::module_& m) {
  py::class_<KeyRun, std::shared_ptr<KeyRun>>(m, "KeyRun", "The block keys one request names (see ControlPlane).")
      .def("__len__", &KeyRun::size)
      .def_property_readonly("keys", [](const KeyRun& r) { return keys_array(r.keys.data(), r.keys.size()); })
      .def_property_readonly("is_chain", &KeyRun::chain);

  py::enum_<flexkv::ReportStatus>(m, "ReportStatus")
      .value("SUCCESS", flexkv::ReportStatus::kSuccess)
      .value("NOTFOUND", flexkv::ReportStatus::kNotFound)
      .value("UNREADY", flexkv::ReportStatus::kUnready)
      .value("TIMEOUT", flexkv::ReportStatus::kTimeout)
      .value("CANCELLED", flexkv::ReportStatus::kCancelled)
      .value("FAILED", flexkv::ReportStatus::kFailed);

  m.def("namespace_seed", [](const std::string& model_fingerprint, int tokens_per_block, const std::string& layout_tag,
                             const std::vector<std::string>& salts) {
    const BlockKey k = flexkv::namespace_seed(flexkv::NamespaceSpec{model_fingerprint, tokens_per_block, layout_tag}, salts);
    KeyArray out(py::ssize_t{2});
    out.mutable_at(0) = k.lo;
    out.mutable_at(1) = k.hi;
    return out;
  }, py::arg("model_fingerprint"), py::arg("tokens_per_block"), py::arg("layout_tag"), py::arg("salts"),
     "The seed of a namespace: the same as ControlPlane.seed for a plane of that model and block size.");

  m.def("salt_block_hashes", [](const KeyArray& seed, const KeyArray& hashes) {
    size_t n;
    const BlockKey* h = keys_of(hashes, &n, "hashes");
    std::vector<BlockKey> out(n);
    flexkv::salt_block_hashes(seed_of(seed), h, n, out.data());
    return keys_array(out.data(), n);
  }, py::arg("seed"), py::arg("hashes"), "The block keys of engine hashes (their first 128 bits) in a namespace.");

  py::class_<ControlPlane, std::shared_ptr<ControlPlane>>(m, "ControlPlane",
                                                          "FlexKV's one cache: tiers, tasks, flows, events, counters.")
      .def(py::init([](const py::dict& options) {
             flexkv::ControlPlaneOptions o = options_of(options);
             std::unique_ptr<ControlPlane> plane;
             {
               py::gil_scoped_release nogil;  // preallocating SSD files and restoring the index take a while
               plane = ControlPlane::create(std::move(o));
             }
             // Destroyed without the GIL: its threads may log (into Python) while it joins them.
             return std::shared_ptr<ControlPlane>(plane.release(), [](ControlPlane* p) {
               if (Py_IsInitialized() && PyGILState_Check()) {
                 py::gil_scoped_release nogil;
                 delete p;
               } else {
                 delete p;
               }
             });
           }),
           py::arg("options"))
      .def("shutdown", &ControlPlane::shutdown, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("closed", &ControlPlane::closed)
      .def_property_readonly("tokens_per_block", &ControlPlane::tokens_per_block)
      .def_property_readonly("block_bytes", [](const ControlPlane& c) { return c.options().block_bytes; })
      .def_property_readonly("model_fingerprint", [](const ControlPlane& c) { return c.options().model_fingerprint; })
      .def_property_readonly("has_ssd", &ControlPlane::has_ssd)
      .def_property_readonly("ssd_restored", &ControlPlane::ssd_restored)
      .def_property_readonly("ssd_io_engine", &ControlPlane::ssd_io_engine)
      .def("tier_info", [](const ControlPlane& c) { return tier_info_dict(c.tier_info()); })
      // ------------------------------------------------------------ keys
      .def("seed", [](const ControlPlane& c, const std::string& layout_tag, const std::vector<std::string>& salts) {
        const BlockKey k = c.seed(layout_tag, salts);
        KeyArray out(py::ssize_t{2});
        out.mutable_at(0) = k.lo;
        out.mutable_at(1) = k.hi;
        return out;
      }, py::arg("layout_tag"), py::arg("salts"))
      .def("token_run", [](const ControlPlane& c, const KeyArray& seed, const I64Array& tokens) {
        if (tokens.ndim() != 1) throw py::value_error("token_ids must be a 1-D int64 array");
        const BlockKey s = seed_of(seed);
        py::gil_scoped_release nogil;
        return c.token_run(s, tokens.data(), static_cast<size_t>(tokens.shape(0)));
      }, py::arg("seed"), py::arg("token_ids"))
      .def("hash_run", [](const ControlPlane& c, const KeyArray& seed, const KeyArray& hashes, const I64Array& tokens) {
        size_t n;
        const BlockKey* h = keys_of(hashes, &n, "block_hashes");
        if (tokens.ndim() != 1) throw py::value_error("token_ids must be a 1-D int64 array");
        const BlockKey s = seed_of(seed);
        py::gil_scoped_release nogil;
        return c.hash_run(s, h, n, tokens.data(), static_cast<size_t>(tokens.shape(0)));
      }, py::arg("seed"), py::arg("block_hashes"), py::arg("token_ids"))
      .def("entry_run", [](const ControlPlane& c, const KeyArray& seed, const KeyArray& keys) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n, "keys");
        return c.entry_run(seed_of(seed), k, n);
      }, py::arg("seed"), py::arg("keys"))
      .def("page_run", [](const ControlPlane& c, const KeyArray& seed, const KeyArray& keys, py::object parent) {
        size_t n;
        const BlockKey* k = keys_of(keys, &n, "keys");
        BlockKey p;
        const BlockKey* pp = nullptr;
        if (!parent.is_none()) {
          p = seed_of(parent.cast<KeyArray>());
          pp = &p;
        }
        py::gil_scoped_release nogil;
        return c.page_run(seed_of(seed), k, n, pp);
      }, py::arg("seed"), py::arg("keys"), py::arg("parent") = py::none())
      // -------------------------------------------------------- protocol
      .def("lookup", [](ControlPlane& c, const KeyRun& run) {
        const flexkv::Lookup l = c.lookup(run);
        return std::make_pair(l.cpu, l.ssd);
      }, py::arg("run"), py::call_guard<py::gil_scoped_release>(),
         "(leading blocks ready in the CPU tier, the same on SSD)")
      .def("get_match", [](ControlPlane& c, std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len) {
        flexkv::Match m;
        {
          py::gil_scoped_release nogil;
          m = c.get_match(std::move(run), first, seq_len);
        }
        return py::make_tuple(m.task, to_array(m.blocks), m.covered);
      }, py::arg("run"), py::arg("first"), py::arg("seq_len"),
         "(task id, run positions of the blocks it loads, leading blocks held once it ends)")
      .def("put_match", [](ControlPlane& c, std::shared_ptr<const KeyRun> run, size_t first, size_t seq_len) {
        flexkv::Match m;
        {
          py::gil_scoped_release nogil;
          m = c.put_match(std::move(run), first, seq_len);
        }
        return py::make_tuple(m.task, to_array(m.blocks), m.covered);
      }, py::arg("run"), py::arg("first"), py::arg("seq_len"),
         "(task id, run positions of the blocks it stores, leading blocks handled: held already or stored)")
      .def("prefetch", &ControlPlane::prefetch, py::arg("run"), py::arg("seq_len"),
           py::call_guard<py::gil_scoped_release>())
      .def("touch", &ControlPlane::touch, py::arg("run"), py::call_guard<py::gil_scoped_release>())
      .def("launch", [](ControlPlane& c, const std::vector<int64_t>& ids, const py::list& targets, bool slots,
                        int32_t layout, bool layerwise) {
        // targets[i]: an int64 array, or a str saying why the facade found the argument malformed.
        std::vector<I64Array> keep;
        std::vector<flexkv::EngineTargets> t(targets.size());
        for (size_t i = 0; i < targets.size(); ++i) {
          t[i].slots = slots;
          if (py::isinstance<py::str>(targets[i])) {
            t[i].error = targets[i].cast<std::string>();
            continue;
          }
          keep.push_back(targets[i].cast<I64Array>());
          if (keep.back().ndim() != 1) throw py::value_error("launch: targets must be 1-D int64 arrays");
          t[i].data = keep.back().data();
          t[i].n = static_cast<size_t>(keep.back().shape(0));
        }
        py::gil_scoped_release nogil;
        c.launch(ids_of(ids), t, layout, layerwise);
      }, py::arg("ids"), py::arg("targets"), py::arg("slots"), py::arg("layout"), py::arg("layerwise") = false)
      .def("take", [](ControlPlane& c, int64_t id, double timeout) {
        flexkv::Taken t;
        {
          py::gil_scoped_release nogil;
          t = c.take(static_cast<flexkv::TaskId>(id), timeout);
        }
        return py::make_tuple(to_array(t.blocks), to_array(t.host_ids));
      }, py::arg("task_id"), py::arg("timeout"))
      .def("try_take", [](ControlPlane& c, int64_t id) -> py::object {
        std::optional<flexkv::Taken> t;
        {
          py::gil_scoped_release nogil;
          t = c.try_take(static_cast<flexkv::TaskId>(id));
        }
        if (!t) return py::none();
        return py::make_tuple(to_array(t->blocks), to_array(t->host_ids));
      }, py::arg("task_id"), "take(task, 0) once its blocks are in the CPU tier; None (the task unchanged) before.")
      .def("complete", [](ControlPlane& c, int64_t id, bool ok, const std::string& error) {
        c.complete(static_cast<flexkv::TaskId>(id), ok, error);
      }, py::arg("task_id"), py::arg("ok"), py::arg("error") = "", py::call_guard<py::gil_scoped_release>())
      .def("cancel", [](ControlPlane& c, const std::vector<int64_t>& ids) { c.cancel(ids_of(ids)); }, py::arg("ids"),
           py::call_guard<py::gil_scoped_release>())
      .def("wait", [](ControlPlane& c, const std::vector<int64_t>& ids, double timeout, bool completely) {
        std::vector<flexkv::Report> r;
        {
          py::gil_scoped_release nogil;
          r = c.wait(ids_of(ids), timeout, completely);
        }
        return reports_list(r);
      }, py::arg("ids"), py::arg("timeout"), py::arg("completely") = false)
      .def("try_wait", [](ControlPlane& c, const std::vector<int64_t>& ids) {
        std::vector<flexkv::Report> r;
        {
          py::gil_scoped_release nogil;
          r = c.try_wait(ids_of(ids));
        }
        return reports_list(r);
      }, py::arg("ids"))
      .def("wait_layer", [](ControlPlane& c, int64_t id, int32_t layer, py::object stream, double timeout) {
        void* s = stream.is_none() ? nullptr : reinterpret_cast<void*>(stream.cast<uintptr_t>());
        py::gil_scoped_release nogil;
        return c.wait_layer(static_cast<flexkv::TaskId>(id), layer, s, timeout);
      }, py::arg("task_id"), py::arg("layer"), py::arg("stream"), py::arg("timeout"))
      .def("flush", &ControlPlane::flush, py::arg("timeout"), py::call_guard<py::gil_scoped_release>(),
           "Waits until no write-through to the SSD tier is pending; False on timeout.")
      .def("reset", &ControlPlane::reset, py::call_guard<py::gil_scoped_release>())
      // --------------------------------------------------- engine memory
      .def("register_rank_layout", &ControlPlane::register_rank_layout, py::arg("num_blocks"),
           py::call_guard<py::gil_scoped_release>(),
           "A handle for KV memory of num_blocks blocks in other processes: launches on it become rank orders.")
      .def("next_rank_order", [](ControlPlane& c, double timeout_s) -> py::object {
        std::optional<flexkv::RankOrder> o;
        {
          py::gil_scoped_release nogil;
          o = c.next_rank_order(timeout_s < 0 ? -1 : static_cast<int64_t>(timeout_s * 1e6));
        }
        if (!o) return py::none();
        const bool load = o->direction == flexkv::CopyDirection::kHostToEngine;
        return py::make_tuple(o->job, o->tag, o->layout_id, load ? "host_to_engine" : "engine_to_host", o->layerwise,
                              to_array(o->engine_blocks), to_array(o->host_blocks));
      }, py::arg("timeout_s"),
         "(job, task, rank layout, direction, layerwise, engine blocks, host blocks) of the next order, or None.")
      .def("finish_rank_order", &ControlPlane::finish_rank_order, py::arg("job"), py::arg("error") = "",
           py::call_guard<py::gil_scoped_release>())
      .def("register_layout", [](ControlPlane& c, const I64Array& segments, int64_t num_blocks, int device) {
        if (segments.ndim() != 2 || segments.shape(1) != 5) {
          throw py::value_error("segments must be a (n, 5) int64 array of [engine_base, engine_block_stride, "
                                "host_offset, bytes, group]");
        }
        flexkv::EngineLayout layout;
        layout.num_blocks = num_blocks;
        auto s = segments.unchecked<2>();
        for (py::ssize_t i = 0; i < segments.shape(0); ++i) {
          layout.segments.push_back(flexkv::CopySegment{static_cast<uint64_t>(s(i, 0)), s(i, 1),
                                                        static_cast<uint64_t>(s(i, 2)), static_cast<uint64_t>(s(i, 3)),
                                                        static_cast<int32_t>(s(i, 4))});
        }
        py::gil_scoped_release nogil;
        return c.register_layout(layout, device);
      }, py::arg("segments"), py::arg("num_blocks"), py::arg("device"))
      .def("unregister_layout", &ControlPlane::unregister_layout, py::arg("handle"),
           py::call_guard<py::gil_scoped_release>())
      // ------------------------------------------ flows outside the core
      .def_property_readonly("object_bytes", &ControlPlane::object_bytes,
                             "Bytes of one block image (header + payload) for tiers kept outside the core.")
      .def_property_readonly("object_fingerprint", &ControlPlane::object_fingerprint,
                             "What block images of this plane's model, block size and bytes record (XXH3-64).")
      .def("export_blocks", [](ControlPlane& c, const KeyRun& run, size_t start, size_t stop) {
        std::vector<uint8_t> buf;
        size_t n;
        {
          py::gil_scoped_release nogil;
          n = c.export_blocks(run, start, stop, &buf);
        }
        const auto each = static_cast<py::ssize_t>(c.object_bytes());
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), each});
        if (n > 0) std::memcpy(out.mutable_data(), buf.data(), buf.size());
        return out;
      }, py::arg("run"), py::arg("start"), py::arg("stop"),
         "(n, object_bytes) images of the run's leading CPU-ready blocks from start, up to stop.")
      .def("import_blocks", [](ControlPlane& c, int64_t id, const py::list& objects) {
        std::vector<py::buffer_info> keep;
        std::vector<const uint8_t*> ptrs(objects.size(), nullptr);
        std::vector<size_t> sizes(objects.size(), 0);
        for (size_t i = 0; i < objects.size(); ++i) {
          if (objects[i].is_none()) continue;
          keep.push_back(objects[i].cast<py::buffer>().request());
          ptrs[i] = static_cast<const uint8_t*>(keep.back().ptr);
          sizes[i] = static_cast<size_t>(keep.back().size * keep.back().itemsize);
        }
        std::vector<uint8_t> ok;
        {
          py::gil_scoped_release nogil;
          ok = c.import_blocks(static_cast<flexkv::TaskId>(id), ptrs.data(), sizes.data(), ptrs.size());
        }
        return to_array(ok);
      }, py::arg("task_id"), py::arg("objects"),
         "Verifies block images (bytes, or None for a miss) of a taken put and copies them in: 1 per good block.")
      .def("add_counters", [](ControlPlane& c, const py::dict& values) {
        std::vector<std::pair<std::string, int64_t>> v;
        for (auto item : values) v.emplace_back(item.first.cast<std::string>(), item.second.cast<int64_t>());
        c.add_counters(v);
      }, py::arg("values"), "Adds a flow's counts to the counters (names from counters()).")
      .def("observe_latency", &ControlPlane::observe_latency, py::arg("name"), py::arg("seconds"),
           "Records one latency of a flow run outside the plane (names from histograms()).")
      // ----------------------------------------------------- observation
      .def("counters", [](const ControlPlane& c) {
        py::dict d;
        for (const auto& [name, value] : c.counters()) d[py::str(name)] = value;
        return d;
      })
      .def("histograms", [](const ControlPlane& c) {
        py::dict d;
        for (const auto& [name, h] : c.histograms()) {
          py::dict one;
          one["bounds"] = h.bounds;
          one["counts"] = h.counts;
          one["sum"] = h.sum;
          one["count"] = h.count;
          d[py::str(name)] = one;
        }
        return d;
      }, "Latency histograms in seconds: name -> {bounds, counts (per bucket, the last +Inf), sum, count}.")
      .def("gauges", [](const ControlPlane& c) {
        std::vector<std::pair<std::string, int64_t>> g;
        {
          py::gil_scoped_release nogil;
          g = c.gauges();
        }
        py::dict d;
        for (const auto& [name, value] : g) d[py::str(name)] = value;
        return d;
      }, "Queue depths now: tasks and promotions in flight, write-through backlog, SSD job queues.")
      .def("index_counts", [](const ControlPlane& c) {
        flexkv::IndexCounts ic;
        {
          py::gil_scoped_release nogil;
          ic = c.index_counts();
        }
        py::dict d;
        d["cpu"] = index_dict(ic.cpu);
        if (ic.ssd) d["ssd"] = index_dict(*ic.ssd);
        return d;
      })
      .def("enable_events", &ControlPlane::enable_events, py::arg("capacity") = 1 << 16)
      .def("take_events", [](ControlPlane& c) {
        py::list out;
        for (const auto& e : c.take_events()) {
          static const char* const kKinds[] = {"stored", "removed", "cleared"};
          out.append(py::make_tuple(kKinds[static_cast<int>(e.kind)], flexkv::tier_name(e.tier),
                                    keys_array(&e.key, 1), keys_array(&e.parent, 1), e.position, to_array(e.tokens)));
        }
        return out;
      }, "Block events since the last call: (kind, tier, key[1,2], parent[1,2], position, tokens).")
      .def_property_readonly("events_dropped", &ControlPlane::events_dropped)
      .def("check_consistency", &ControlPlane::check_consistency, py::call_guard<py::gil_scoped_release>())
      .def("locked_blocks", &ControlPlane::locked_blocks, py::call_guard<py::gil_scoped_release>())
      .def("inspect", [](ControlPlane& c, int64_t id) -> py::object {
        std::optional<flexkv::TaskView> v = c.inspect(static_cast<flexkv::TaskId>(id));
        if (!v) return py::none();
        py::dict d;
        d["state"] = v->state;
        d["kind"] = v->kind;
        d["blocks"] = to_array(v->blocks);
        d["host_ids"] = to_array(v->host_ids);
        d["held"] = to_array(v->held);
        return d;
      }, py::arg("task_id"), "What a task holds: state, kind, blocks, host_ids, held (None once reported).")
      .def("ssd_slots", [](ControlPlane& c, const KeyRun& run) { return to_array(c.ssd_slots(run)); }, py::arg("run"),
           "The SSD slots of the run's leading blocks on SSD.")
      .def_property_readonly("ssd_slot_bytes", &ControlPlane::ssd_slot_bytes)
      .def("cpu_block", &ControlPlane::cpu_block, py::arg("block_id"), "(ready, lock count) of a CPU block.")
      .def("invalidate", &ControlPlane::invalidate, py::arg("run"), py::arg("start"),
           py::call_guard<py::gil_scoped_release>())
      .def("pause_completions", &ControlPlane::pause_completions, py::arg("paused"),
           py::call_guard<py::gil_scoped_release>());
}
