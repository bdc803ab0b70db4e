#include "transfer/host_copy_engine.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace flexkv {
namespace {

// Copies with non-temporal stores when the destination is 16-byte aligned and
// the chunk is large: the stores skip the read-for-ownership of every
// destination line that plain stores pay, which is what large memcpys avoid too.
// Callers fence (sfence) once after a batch of copies.
constexpr size_t kStreamingMinBytes = 4096;

void copy_chunk(uint8_t* dst, const uint8_t* src, size_t n) {
#if defined(__SSE2__)
  if (n >= kStreamingMinBytes && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const size_t vec = n & ~size_t{63};
    for (size_t i = 0; i < vec; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
    }
    if (vec < n) std::memcpy(dst + vec, src + vec, n - vec);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace

struct HostCopyEngine::Job {
  uint64_t id = 0;
  CopyDirection dir = CopyDirection::kHostToEngine;
  EngineLayout layout;
  HostRegion host;
  std::vector<int64_t> engine_blocks;
  std::vector<int64_t> host_blocks;
  size_t num_items = 0;  // blocks x segments
  size_t batch = 1;      // items claimed at a time by one worker
  size_t next = 0;       // the first item not yet claimed; guarded by the engine's mutex
  size_t finished = 0;   // items copied; guarded by the engine's mutex
  bool complete = false;  // guarded by the engine's mutex
};

HostCopyEngine::HostCopyEngine(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("HostCopyEngine: num_threads must be >= 1");
  try {
    for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    shut_down();  // join the threads that did start before reporting the failure
    throw;
  }
}

void HostCopyEngine::shut_down() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

HostCopyEngine::~HostCopyEngine() { shut_down(); }

void HostCopyEngine::validate(const EngineLayout& layout, const HostRegion& host) {
  validate_layout(layout, host);
}

uint64_t HostCopyEngine::submit(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
                                const int64_t* engine_blocks, const int64_t* host_blocks, size_t n,
                                bool urgent) {
  validate(layout, host);
  check_block_ids(layout, host, engine_blocks, host_blocks, n);
  auto job = std::make_shared<Job>();
  job->dir = dir;
  job->layout = layout;
  job->host = host;
  job->engine_blocks.assign(engine_blocks, engine_blocks + n);
  job->host_blocks.assign(host_blocks, host_blocks + n);
  job->num_items = n * layout.segments.size();
  const size_t parts = workers_.size() * 4;
  job->batch = std::max<size_t>(1, (job->num_items + parts - 1) / parts);
  std::lock_guard<std::mutex> g(mu_);
  job->id = next_id_++;
  jobs_[job->id] = job;
  if (job->num_items == 0) {
    complete(*job);
  } else {
    (urgent ? urgent_ : queue_).push_back(job);
    work_cv_.notify_all();
  }
  return job->id;
}

void HostCopyEngine::complete(Job& job) {
  job.complete = true;
  finished_.push_back(job.id);
  done_cv_.notify_all();
}

void HostCopyEngine::run_items(Job& job, size_t begin, size_t end) {
  const size_t nseg = job.layout.segments.size();
  const bool to_engine = job.dir == CopyDirection::kHostToEngine;
  // (source, destination) of one item: block item / nseg, segment item % nseg.
  auto locate = [&job, nseg, to_engine](size_t item, uint8_t** src, uint8_t** dst) {
    const size_t b = item / nseg;
    const CopySegment& seg = job.layout.segments[item % nseg];
    uint8_t* engine = reinterpret_cast<uint8_t*>(seg.engine_base) + job.engine_blocks[b] * seg.engine_block_stride;
    uint8_t* host = reinterpret_cast<uint8_t*>(job.host.base) +
                    static_cast<uint64_t>(job.host_blocks[b]) * job.host.block_bytes + seg.host_offset;
    *src = to_engine ? host : engine;
    *dst = to_engine ? engine : host;
    return seg.bytes;
  };
  uint8_t* src;
  uint8_t* dst;
  size_t bytes = begin < end ? locate(begin, &src, &dst) : 0;
  for (size_t item = begin; item < end; ++item) {
    uint8_t* next_src = nullptr;
    uint8_t* next_dst = nullptr;
    size_t next_bytes = 0;
    if (item + 1 < end) {
      // Chunks are scattered: start the next chunk's first lines (and its page walk) early, since
      // hardware prefetchers stop at page boundaries.
      next_bytes = locate(item + 1, &next_src, &next_dst);
      for (size_t off = 0; off < 512 && off < next_bytes; off += 64) __builtin_prefetch(next_src + off, 0, 0);
    }
    copy_chunk(dst, src, bytes);
    src = next_src;
    dst = next_dst;
    bytes = next_bytes;
  }
  store_fence();  // the streaming stores are visible before the job is reported done
}

void HostCopyEngine::worker_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    work_cv_.wait(lk, [this] { return stopping_ || !urgent_.empty() || !queue_.empty(); });
    std::deque<std::shared_ptr<Job>>& q = urgent_.empty() ? queue_ : urgent_;
    if (q.empty()) return;  // stopping, and nothing left to copy
    std::shared_ptr<Job> job = q.front();
    const size_t begin = job->next;
    const size_t end = std::min(job->num_items, begin + job->batch);
    job->next = end;
    if (end == job->num_items) q.pop_front();  // every item is claimed
    lk.unlock();
    run_items(*job, begin, end);
    lk.lock();
    job->finished += end - begin;
    if (job->finished == job->num_items) complete(*job);
  }
}

bool HostCopyEngine::wait(uint64_t job_id, int64_t timeout_us) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) throw std::out_of_range("unknown copy job " + std::to_string(job_id));
  std::shared_ptr<Job> job = it->second;
  auto finished = [&job] { return job->complete; };
  if (timeout_us < 0) {
    done_cv_.wait(lk, finished);
  } else if (!done_cv_.wait_for(lk, std::chrono::microseconds(timeout_us), finished)) {
    return false;
  }
  jobs_.erase(job_id);
  finished_.erase(std::find(finished_.begin(), finished_.end(), job_id));
  return true;
}

uint64_t HostCopyEngine::wait_any(int64_t timeout_us) {
  std::unique_lock<std::mutex> lk(mu_);
  auto any = [this] { return !finished_.empty(); };
  if (timeout_us < 0) {
    done_cv_.wait(lk, any);
  } else if (!done_cv_.wait_for(lk, std::chrono::microseconds(timeout_us), any)) {
    return 0;
  }
  const uint64_t id = finished_.front();
  finished_.pop_front();
  jobs_.erase(id);
  return id;
}

bool HostCopyEngine::done(uint64_t job_id) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) throw std::out_of_range("unknown copy job " + std::to_string(job_id));
  return it->second->complete;
}

void HostCopyEngine::copy(CopyDirection dir, const EngineLayout& layout, const HostRegion& host,
                          const int64_t* engine_blocks, const int64_t* host_blocks, size_t n) {
  wait(submit(dir, layout, host, engine_blocks, host_blocks, n), -1);
}

}  // namespace flexkv
