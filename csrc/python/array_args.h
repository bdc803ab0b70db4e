// Argument parsing shared by the bindings: numpy arrays of ids, and the copy
// engines' layouts, directions and block lists.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "transfer/copy_layout.h"

namespace flexkv::python {

namespace py = pybind11;

// No forcecast: an array of another dtype converts only where numpy's safe casting
// allows (int32 -> int64), so floats and out-of-range ids are refused, not truncated.
using I64Array = py::array_t<int64_t, py::array::c_style>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

inline void check_1d(const py::array& a, const char* what) {
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be a 1-D array");
}

// segments: (n, 4) rows [engine_base, engine_block_stride, host_offset, bytes], or (n, 5) with the group last.
inline EngineLayout layout_of(const I64Array& segments, int64_t engine_num_blocks) {
  if (segments.ndim() != 2 || (segments.shape(1) != 4 && segments.shape(1) != 5)) {
    throw py::value_error("segments must be a (n, 4) or (n, 5) int64 array of [engine_base, engine_block_stride, "
                          "host_offset, bytes(, group)]");
  }
  EngineLayout layout;
  layout.num_blocks = engine_num_blocks;
  const bool grouped = segments.shape(1) == 5;
  auto s = segments.unchecked<2>();
  for (py::ssize_t i = 0; i < segments.shape(0); ++i) {
    if (s(i, 0) <= 0 || s(i, 2) < 0 || s(i, 3) <= 0) {
      throw py::value_error("segment " + std::to_string(i) + " has a null base, a negative offset or no bytes");
    }
    layout.segments.push_back(CopySegment{static_cast<uint64_t>(s(i, 0)), s(i, 1), static_cast<uint64_t>(s(i, 2)),
                                          static_cast<uint64_t>(s(i, 3)),
                                          grouped ? static_cast<int32_t>(s(i, 4)) : 0});
  }
  return layout;
}

inline CopyDirection direction_of(const std::string& d) {
  if (d == "host_to_engine") return CopyDirection::kHostToEngine;
  if (d == "engine_to_host") return CopyDirection::kEngineToHost;
  throw py::value_error("direction must be 'host_to_engine' or 'engine_to_host', got '" + d + "'");
}

// The number of blocks a submit copies: engine_blocks[i] <-> host_blocks[i], two 1-D arrays of one length.
inline size_t block_pairs(const I64Array& engine_blocks, const I64Array& host_blocks) {
  check_1d(engine_blocks, "engine_blocks");
  check_1d(host_blocks, "host_blocks");
  if (engine_blocks.shape(0) != host_blocks.shape(0)) {
    throw py::value_error("engine_blocks and host_blocks differ in length (" + std::to_string(engine_blocks.shape(0)) +
                          " vs " + std::to_string(host_blocks.shape(0)) + ")");
  }
  return static_cast<size_t>(engine_blocks.shape(0));
}

}  // namespace flexkv::python
