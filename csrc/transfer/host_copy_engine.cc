#include "transfer/host_copy_engine.h"

#include <algorithm>
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
  std::shared_ptr<const Layout> layout;
  std::vector<int64_t> engine_blocks;
  std::vector<int64_t> host_blocks;
  size_t num_items = 0;  // blocks x segments; item i is block i / segments, segment i % segments
  size_t batch = 1;      // items claimed at a time by one thread
  size_t next = 0;       // the first item not yet claimed; guarded by the engine's mu_
  size_t finished = 0;   // items copied; guarded by the engine's mu_

  // Copies items [begin, end).
  void run(size_t begin, size_t end) const;
};

void HostCopyEngine::Job::run(size_t begin, size_t end) const {
  const std::vector<CopySegment>& segs = layout->layout.segments;
  const HostRegion& host = layout->host;
  const size_t nseg = segs.size();
  const bool to_engine = dir == CopyDirection::kHostToEngine;
  // (source, destination) of one item.
  auto locate = [&](size_t item, uint8_t** src, uint8_t** dst) {
    const size_t b = item / nseg;
    const CopySegment& seg = segs[item % nseg];
    uint8_t* engine = reinterpret_cast<uint8_t*>(seg.engine_base) + engine_blocks[b] * seg.engine_block_stride;
    uint8_t* hst = reinterpret_cast<uint8_t*>(host.base) +
                   static_cast<uint64_t>(host_blocks[b]) * host.block_bytes + seg.host_offset;
    *src = to_engine ? hst : engine;
    *dst = to_engine ? engine : hst;
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

HostCopyEngine::HostCopyEngine(int num_threads) {
  if (num_threads < 1) throw std::invalid_argument("HostCopyEngine: num_threads must be >= 1");
  try {
    for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (...) {
    stop_workers();  // join the threads that did start before reporting the failure
    throw;
  }
}

HostCopyEngine::~HostCopyEngine() {
  stop_workers();
  shut_down_registry();
}

void HostCopyEngine::stop_workers() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

CopyEngineBase::Pinned HostCopyEngine::pin(uint64_t base, uint64_t) { return Pinned{base, false}; }

uint64_t HostCopyEngine::submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks,
                                const int64_t* host_blocks, size_t n, bool urgent, bool, uint64_t tag) {
  auto job = std::make_shared<Job>();
  job->layout = find_layout(layout_id);
  check_block_ids(job->layout->layout, job->layout->host, engine_blocks, host_blocks, n);
  job->dir = dir;
  job->engine_blocks.assign(engine_blocks, engine_blocks + n);
  job->host_blocks.assign(host_blocks, host_blocks + n);
  job->num_items = n * job->layout->layout.segments.size();
  const size_t parts = workers_.size() * 4;
  job->batch = std::max<size_t>(1, (job->num_items + parts - 1) / parts);
  const uint64_t id = add_job(layout_id, tag);
  job->id = id;
  if (job->num_items == 0) {
    jobs_.finish(id, "");
    return id;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    (urgent ? urgent_ : queue_).push_back(std::move(job));
  }
  work_cv_.notify_all();
  return id;
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
    job->run(begin, end);
    lk.lock();
    job->finished += end - begin;
    if (job->finished == job->num_items) {
      lk.unlock();
      jobs_.finish(job->id, "");
      job.reset();
      lk.lock();
    }
  }
}

void HostCopyEngine::wait_group(uint64_t job, int32_t) { jobs_.wait_finished(job); }

void HostCopyEngine::stream_wait_group(uint64_t, int32_t, void*) {
  throw std::logic_error("stream_wait_group: the host copy engine has no CUDA streams; use wait_group");
}

std::unique_ptr<CopyEngine> make_host_copy_engine(int threads) { return std::make_unique<HostCopyEngine>(threads); }

}  // namespace flexkv
