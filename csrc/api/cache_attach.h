// Opening a Cache on a control plane another facade already drives (the
// Python module does this, so the C++ API and KVManager share one cache in one
// process). Not part of the public API.
#pragma once

#include <memory>

#include "control/control_plane.h"
#include "flexkv/cache.h"

namespace flexkv {

struct CacheAccess {
  // `model` must be the shape the plane was opened for (same fingerprint and block bytes).
  static std::unique_ptr<Cache> attach(std::shared_ptr<ControlPlane> plane, const ModelShape& model);
};

}  // namespace flexkv
