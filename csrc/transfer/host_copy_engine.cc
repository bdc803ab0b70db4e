#include "transfer/host_copy_engine.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FLEXKV_HOST_COPY_AVX2 1
#endif

namespace flexkv {
namespace {

// Chunks of this size and more, to a 16-byte aligned destination, are copied
// with non-temporal stores: they skip the read-for-ownership of every
// destination line that plain stores pay, which is what large memcpys avoid
// too. Callers fence (sfence) once after a batch of copies.
constexpr size_t kStreamingMinBytes = 4096;
// A thread claims at most about this many bytes of a job at a time, so that
// two threads finish a large job together even when one is slowed down.
constexpr size_t kClaimBytes = size_t{1} << 20;
// A job of at most this many bytes is copied by the submitting thread before
// submit returns: that takes tens of microseconds, less than handing it to a
// copy thread, and on a machine whose cores are all busy (an engine's forward
// on every other core) waking a copy thread preempts the submitter for a whole
// scheduler slice.
constexpr size_t kInlineBytes = size_t{1} << 20;
// Bytes of the next chunk prefetched while the current one is copied: chunks
// are scattered, and the hardware prefetchers stop at page boundaries.
constexpr size_t kPrefetchBytes = 512;

// The streaming copies below write every 16-byte piece of a chunk with
// non-temporal stores, its ends included: a line written partly by plain
// stores is fetched into the cache, and streaming stores into it then cost far
// more than either kind alone. Only a tail under 16 bytes goes through memcpy.

#if defined(__SSE2__)
// dst 16-byte aligned, n a multiple of 16.
void stream_sse2(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  for (; i < n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
}
#endif

#if defined(FLEXKV_HOST_COPY_AVX2)
// dst 16-byte aligned, n a multiple of 16. 32-byte loads and streaming stores:
// on the 2-core EPYC VM of BENCHMARKS.md they move scattered chunks 15-25%
// faster than 16-byte ones.
__attribute__((target("avx2"))) void stream_avx2(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t i = 0;
  if ((reinterpret_cast<uintptr_t>(dst) & 31) != 0 && n >= 16) {  // one 16-byte store aligns dst to 32
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    i = 16;
  }
  for (; i + 64 <= n; i += 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
  }
  for (; i < n; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
}

bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}
#endif

void copy_chunk(uint8_t* dst, const uint8_t* src, size_t n) {
#if defined(__SSE2__)
  if (n >= kStreamingMinBytes && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const size_t vec = n & ~size_t{15};
#if defined(FLEXKV_HOST_COPY_AVX2)
    if (has_avx2()) {
      stream_avx2(dst, src, vec);
    } else {
      stream_sse2(dst, src, vec);
    }
#else
    stream_sse2(dst, src, vec);
#endif
    std::memcpy(dst + vec, src + vec, n - vec);
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

// What the host engine keeps of a registered layout.
struct HostLayoutData {
  uint64_t bytes_per_block = 0;  // the segments' bytes together
};

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
      // Start the next chunk's first lines (and its page walk) early.
      next_bytes = locate(item + 1, &next_src, &next_dst);
      for (size_t off = 0; off < kPrefetchBytes && off < next_bytes; off += 64) {
        __builtin_prefetch(next_src + off, 0, 0);
      }
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

std::shared_ptr<const void> HostCopyEngine::prepare_layout(const Layout& layout) {
  auto data = std::make_shared<HostLayoutData>();
  for (const CopySegment& s : layout.layout.segments) data->bytes_per_block += s.bytes;
  return data;
}

uint64_t HostCopyEngine::submit(CopyDirection dir, int32_t layout_id, const int64_t* engine_blocks,
                                const int64_t* host_blocks, size_t n, bool urgent, bool, uint64_t tag) {
  auto job = std::make_shared<Job>();
  job->layout = find_layout(layout_id);
  check_block_ids(job->layout->layout, job->layout->host, engine_blocks, host_blocks, n);
  job->dir = dir;
  job->engine_blocks.assign(engine_blocks, engine_blocks + n);
  job->host_blocks.assign(host_blocks, host_blocks + n);
  const size_t nseg = job->layout->layout.segments.size();
  job->num_items = n * nseg;
  // Each thread gets about 4 claims of a small job; a large job goes in claims of about kClaimBytes.
  const size_t parts = workers_.size() * 4;
  const auto& data = *std::static_pointer_cast<const HostLayoutData>(job->layout->engine_data);
  const uint64_t item_bytes = std::max<uint64_t>(1, data.bytes_per_block / nseg);
  job->batch = std::max<size_t>(1, std::min<size_t>((job->num_items + parts - 1) / parts, kClaimBytes / item_bytes));
  const uint64_t id = add_job(layout_id, tag);
  job->id = id;
  if (job->num_items == 0) {
    jobs_.finish(id, "");
    return id;
  }
  if (n * data.bytes_per_block <= kInlineBytes) {
    job->run(0, job->num_items);
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
