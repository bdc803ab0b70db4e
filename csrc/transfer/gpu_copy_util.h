// CUDA helpers of the GPU copy engine (CUDA builds only): error text, the
// device of the calling thread, and pools of pinned staging buffers and events
// that are recycled instead of created per job.
//
// The pools' mutexes guard their free lists only: no CUDA call is made while
// one is held, so a CUDA host callback that returns a buffer never waits for a
// thread inside a CUDA call.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace flexkv::gpu {

inline std::string cuda_message(cudaError_t err, const char* what) {
  return std::string(what) + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(cuda_message(err, what));
}

// Selects the device for the calling thread for the scope, and restores the previous one.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = -1;
    cudaGetDevice(&now);
    if (previous_ >= 0 && now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// Pinned staging buffers for the block lists a job uploads, recycled after the
// job completes (cudaHostAlloc is far too slow to call per job).
class PinnedPool {
 public:
  using Buffer = std::pair<void*, size_t>;
  ~PinnedPool() {
    for (auto& b : free_) cudaFreeHost(b.first);
  }
  Buffer take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second >= bytes && (best == free_.end() || it->second < best->second)) best = it;
      }
      if (best != free_.end()) {
        Buffer out = *best;
        free_.erase(best);
        return out;
      }
    }
    size_t size = 64 * 1024;
    while (size < bytes) size *= 2;
    void* p = nullptr;
    check(cudaHostAlloc(&p, size, cudaHostAllocPortable), "cudaHostAlloc (staging)");
    return {p, size};
  }
  // Safe in a CUDA host callback: no CUDA call.
  void give(Buffer b) {
    if (b.first == nullptr) return;
    std::lock_guard<std::mutex> g(mu_);
    free_.push_back(b);
  }

 private:
  std::mutex mu_;
  std::vector<Buffer> free_;
};

// Events (timing disabled) for a submit's fork and join of its copy streams.
// An event goes back to the pool as soon as the submit has issued its last
// cudaStreamWaitEvent on it: a wait captures the event's latest record at the
// time of the call, so recording it again later does not affect that wait.
class EventPool {
 public:
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
  }
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    return e;
  }
  void give(const std::vector<cudaEvent_t>& events) {
    std::lock_guard<std::mutex> g(mu_);
    free_.insert(free_.end(), events.begin(), events.end());
  }

 private:
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
};

}  // namespace flexkv::gpu
