// The CopyEngine contract (transfer/copy_engine.h), one test body for every
// engine. A test binary includes this header once and defines, in namespace
// contract, the engine under test and its engine-side memory:
//
//   std::unique_ptr<flexkv::CopyEngine> make_engine(int threads);  // threads: the host engine's pool
//   EngineMemory& engine_memory();
//
// test_copy_engine.cc runs it on the host engine, test_copy_engine_gpu.cc on
// the GPU engine (CUDA builds, on a machine with a device).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "check.h"
#include "transfer/copy_engine.h"

namespace contract {

using flexkv::CopyDirection;
using flexkv::CopyEngine;

// Where the engine side lives (host RAM or device memory) and how the test
// reaches it. write and read have completed when they return.
struct EngineMemory {
  virtual ~EngineMemory() = default;
  virtual uint8_t* alloc(size_t bytes) = 0;
  virtual void release(uint8_t* p) = 0;
  virtual void write(uint8_t* dst, const uint8_t* src, size_t n) = 0;
  virtual void read(uint8_t* dst, const uint8_t* src, size_t n) = 0;
};

std::unique_ptr<CopyEngine> make_engine(int threads);
EngineMemory& engine_memory();

constexpr uint8_t kPoison = 0xA5;

inline void fill_random(uint8_t* p, size_t n, std::mt19937& rng) {
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const uint32_t v = rng();
    std::memcpy(p + i, &v, 4);
  }
  for (; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
}

// A per-layer engine layout with gaps everywhere a copy must not write: 4
// segments (2 layers x K, V) in 4 engine arrays whose blocks are padded
// (stride > chunk), and host blocks with a gap between segments 2 and 3 and a
// tail. Engine and host memory start as random bytes; `mirror` keeps the
// engine side's bytes on the host.
struct Rig {
  static constexpr size_t kSegs = 4;
  size_t nb, hb, chunk, stride, host_block;
  std::vector<uint8_t*> arrays;
  std::vector<std::vector<uint8_t>> mirror;
  uint8_t* host = nullptr;
  flexkv::EngineLayout layout;
  flexkv::HostRegion region;

  Rig(size_t engine_blocks, size_t host_blocks, size_t chunk_bytes, uint32_t seed)
      : nb(engine_blocks), hb(host_blocks), chunk(chunk_bytes), stride(chunk_bytes + 128),
        host_block(kSegs * chunk_bytes + 64) {
    std::mt19937 rng(seed);
    layout.num_blocks = static_cast<int64_t>(nb);
    for (size_t s = 0; s < kSegs; ++s) {
      std::vector<uint8_t> bytes(nb * stride);
      fill_random(bytes.data(), bytes.size(), rng);
      uint8_t* a = engine_memory().alloc(bytes.size());
      engine_memory().write(a, bytes.data(), bytes.size());
      arrays.push_back(a);
      mirror.push_back(std::move(bytes));
      const uint64_t offset = s * chunk + (s == 3 ? 16 : 0);
      layout.segments.push_back({reinterpret_cast<uint64_t>(a), static_cast<int64_t>(stride), offset, chunk,
                                 static_cast<int32_t>(s / 2)});
    }
    const size_t host_bytes = (hb * host_block + 4095) / 4096 * 4096;
    host = static_cast<uint8_t*>(std::aligned_alloc(4096, host_bytes));
    fill_random(host, host_bytes, rng);
    region = flexkv::HostRegion{reinterpret_cast<uint64_t>(host), host_block, static_cast<int64_t>(hb)};
  }
  ~Rig() {
    for (uint8_t* a : arrays) engine_memory().release(a);
    std::free(host);
  }
  uint64_t host_bytes() const { return hb * host_block; }
  uint8_t* host_block_at(int64_t b) const { return host + b * host_block; }
  uint64_t segment_offset(size_t s) const { return layout.segments[s].host_offset; }

  // Registers the host tier and the layout with `e`; returns the layout id.
  int32_t attach(CopyEngine& e) const {
    e.register_host(reinterpret_cast<uint64_t>(host), host_bytes());
    return e.register_layout(layout, region);
  }
  // The mirror keeps the original bytes: only source blocks, never written, are compared with it.
  void poison_engine(int64_t b) {
    std::vector<uint8_t> p(stride, kPoison);
    for (size_t s = 0; s < kSegs; ++s) engine_memory().write(arrays[s] + b * stride, p.data(), stride);
  }
  void poison_host(int64_t b) { std::memset(host_block_at(b), kPoison, host_block); }
  // True when host block h holds engine block e's segments and poison elsewhere.
  bool host_holds(int64_t h, int64_t e) const {
    const uint8_t* blk = host_block_at(h);
    std::vector<bool> covered(host_block, false);
    for (size_t s = 0; s < kSegs; ++s) {
      if (std::memcmp(blk + segment_offset(s), mirror[s].data() + e * stride, chunk) != 0) return false;
      std::fill(covered.begin() + segment_offset(s), covered.begin() + segment_offset(s) + chunk, true);
    }
    for (size_t i = 0; i < host_block; ++i) {
      if (!covered[i] && blk[i] != kPoison) return false;
    }
    return true;
  }
  // True when engine block e (read back from engine memory) holds host block h's
  // segments and poison in its padding.
  bool engine_holds(int64_t e, int64_t h) const {
    std::vector<uint8_t> got(stride);
    for (size_t s = 0; s < kSegs; ++s) {
      engine_memory().read(got.data(), arrays[s] + e * stride, stride);
      if (std::memcmp(got.data(), host_block_at(h) + segment_offset(s), chunk) != 0) return false;
      for (size_t i = chunk; i < stride; ++i) {
        if (got[i] != kPoison) return false;
      }
    }
    return true;
  }
};

inline std::vector<int64_t> iota_ids(int64_t from, int64_t n) {
  std::vector<int64_t> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = from + i;
  return v;
}

}  // namespace contract

TEST(tags_come_back_with_their_job_in_completion_order) {
  using namespace contract;
  Rig rig(64, 64, 4096, 1);
  auto e = make_engine(1);
  const int32_t layout = rig.attach(*e);
  for (int64_t b = 0; b < 64; ++b) rig.poison_host(b);
  std::vector<std::pair<uint64_t, uint64_t>> submitted;  // (job, tag), one queue: they finish in this order
  for (int j = 0; j < 8; ++j) {
    const auto ids = iota_ids(8 * j, 8);
    const uint64_t tag = 1000 + 7 * j;
    submitted.push_back({e->submit(CopyDirection::kEngineToHost, layout, ids.data(), ids.data(), 8, false, false, tag),
                         tag});
  }
  std::vector<std::pair<uint64_t, uint64_t>> collected;
  while (collected.size() < submitted.size()) {
    auto c = e->next_completion(10'000'000);
    CHECK(c.has_value());
    if (!c) break;
    CHECK(c->error.empty());
    collected.push_back({c->job, c->tag});
  }
  CHECK(collected == submitted);
  CHECK(!e->next_completion(0).has_value());
  CHECK_EQ(e->in_flight(), 0u);
  for (int64_t b = 0; b < 64; ++b) CHECK(rig.host_holds(b, b));
}

TEST(each_job_is_collected_once) {
  using namespace contract;
  Rig rig(16, 16, 1024, 2);
  auto e = make_engine(2);
  const int32_t layout = rig.attach(*e);
  const auto ids = iota_ids(0, 4);
  const uint64_t a = e->submit(CopyDirection::kEngineToHost, layout, ids.data(), ids.data(), 4, false, false, 1);
  std::string error = "unset";
  CHECK(e->wait(a, -1, &error));
  CHECK(error.empty());
  CHECK_THROWS(e->wait(a, 0));                  // collected by wait
  CHECK(!e->next_completion(0).has_value());    // and not handed out again
  const uint64_t b = e->submit(CopyDirection::kEngineToHost, layout, ids.data(), ids.data(), 4, false, false, 2);
  auto c = e->next_completion(10'000'000);
  CHECK(c.has_value() && c->job == b && c->tag == 2);
  CHECK_THROWS(e->wait(b, 0));                  // collected by next_completion
  CHECK_THROWS(e->wait(b + 1000, 0));           // never submitted
  CHECK_THROWS(e->wait(0, 0));
  const uint64_t empty = e->submit(CopyDirection::kEngineToHost, layout, ids.data(), ids.data(), 0, false, false, 3);
  CHECK(e->wait(empty, 10'000'000));            // nothing to copy: complete at once
  CHECK_EQ(e->in_flight(), 0u);
}

TEST(urgent_jobs_go_ahead_of_queued_ones) {
  using namespace contract;
  // 128 MiB per store: the stores must still be queued when the load arrives, on a GPU too.
  Rig rig(1024, 1040, 32768, 3);
  auto e = make_engine(1);
  const int32_t layout = rig.attach(*e);
  const auto all = iota_ids(0, 1023);  // engine block 1023 is the load's alone
  // Warm-up: the engine's per-job resources (staging buffers, device pools) exist before the timed burst,
  // so no submit below waits for an allocation while the stores drain.
  {
    std::vector<uint64_t> warm;
    for (int j = 0; j < 8; ++j) {
      warm.push_back(e->submit(CopyDirection::kEngineToHost, layout, all.data(), all.data(), 1023, j == 7, false, 0));
    }
    for (uint64_t w : warm) CHECK(e->wait(w, 60'000'000));
  }
  std::vector<uint64_t> stores;
  for (int j = 0; j < 6; ++j) {
    stores.push_back(e->submit(CopyDirection::kEngineToHost, layout, all.data(), all.data(), 1023, false, false, 0));
  }
  const std::vector<int64_t> one_e{1023}, one_h{1030};
  const uint64_t load = e->submit(CopyDirection::kHostToEngine, layout, one_e.data(), one_h.data(), 1, true, false, 1);
  std::vector<uint64_t> order;
  for (int k = 0; k < 7; ++k) {
    auto c = e->next_completion(60'000'000);
    CHECK(c.has_value());
    if (!c) return;
    order.push_back(c->job);
  }
  CHECK(std::find(order.begin(), order.end(), load) < std::find(order.begin(), order.end(), stores.back()));
}

TEST(bad_block_ids_and_unknown_layouts_queue_nothing) {
  using namespace contract;
  Rig rig(8, 8, 1024, 4);
  auto e = make_engine(2);
  const int32_t layout = rig.attach(*e);
  for (int64_t b = 0; b < 8; ++b) rig.poison_host(b);
  const std::vector<int64_t> good{0, 1}, bad_engine{0, 8}, bad_host{0, -1};
  bool threw = false;
  try {
    e->submit(CopyDirection::kEngineToHost, layout, bad_engine.data(), good.data(), 2, false, false, 0);
  } catch (const std::out_of_range& x) {
    threw = std::strstr(x.what(), "engine block id 8") != nullptr;
  }
  CHECK(threw);
  CHECK_THROWS(e->submit(CopyDirection::kEngineToHost, layout, good.data(), bad_host.data(), 2, false, false, 0));
  threw = false;
  try {
    e->submit(CopyDirection::kEngineToHost, layout + 99, good.data(), good.data(), 2, false, false, 0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  // A layout refused at registration gets no id; one unregistered is unknown afterwards.
  flexkv::EngineLayout too_big = rig.layout;
  too_big.segments[3].host_offset = rig.host_block;  // past the end of a host block
  CHECK_THROWS(e->register_layout(too_big, rig.region));
  flexkv::HostRegion elsewhere = rig.region;
  elsewhere.base += rig.host_bytes();  // not inside the registered range
  CHECK_THROWS(e->register_layout(rig.layout, elsewhere));
  const int32_t second = e->register_layout(rig.layout, rig.region);
  CHECK(second != layout);
  e->unregister_layout(second);
  CHECK_THROWS(e->submit(CopyDirection::kEngineToHost, second, good.data(), good.data(), 2, false, false, 0));
  CHECK_THROWS(e->unregister_layout(second));
  CHECK_EQ(e->in_flight(), 0u);
  CHECK(!e->next_completion(0).has_value());
  for (int64_t b = 0; b < 8; ++b) {
    for (size_t i = 0; i < rig.host_block; ++i) {
      if (rig.host_block_at(b)[i] != kPoison) {
        CHECK(!"a refused submit wrote to the host tier");
        return;
      }
    }
  }
  // Unregistering the host range forgets the layouts on it.
  e->unregister_host(reinterpret_cast<uint64_t>(rig.host));
  CHECK_THROWS(e->submit(CopyDirection::kEngineToHost, layout, good.data(), good.data(), 2, false, false, 0));
  CHECK_THROWS(e->unregister_host(reinterpret_cast<uint64_t>(rig.host)));
}

TEST(interrupt_wakes_a_waiting_next_completion) {
  using namespace contract;
  Rig rig(8, 8, 1024, 5);
  auto e = make_engine(2);
  const int32_t layout = rig.attach(*e);
  std::atomic<bool> returned{false};
  bool got_one = true;
  std::thread collector([&] {
    got_one = e->next_completion(-1).has_value();
    returned = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(!returned.load());  // nothing to collect: still waiting
  const auto t0 = std::chrono::steady_clock::now();
  e->interrupt();
  collector.join();
  CHECK(!got_one);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  const auto ids = iota_ids(0, 2);
  const uint64_t job = e->submit(CopyDirection::kEngineToHost, layout, ids.data(), ids.data(), 2, false, false, 9);
  CHECK(!e->next_completion(-1).has_value());  // still interrupted, even with a job to collect
  e->resume();
  auto c = e->next_completion(10'000'000);
  CHECK(c.has_value() && c->job == job && c->tag == 9);
}

TEST(wait_group_returns_for_finished_and_collected_jobs) {
  using namespace contract;
  Rig rig(64, 64, 4096, 6);
  auto e = make_engine(2);
  const int32_t layout = rig.attach(*e);
  for (int64_t b = 0; b < 64; ++b) rig.poison_engine(b);
  const auto ids = iota_ids(0, 64);
  const uint64_t job = e->submit(CopyDirection::kHostToEngine, layout, ids.data(), ids.data(), 64, true, true, 0);
  e->wait_group(job, 0);
  e->wait_group(job, 1);  // the last group: the whole job has been copied
  CHECK(rig.engine_holds(17, 17));
  CHECK(rig.engine_holds(63, 63));
  e->wait_group(job, 0);  // copied; the engine reports the job finished right after (a GPU engine: by a callback)
  CHECK(e->wait(job, 10'000'000));
  const auto t0 = std::chrono::steady_clock::now();
  e->wait_group(job, 1);  // collected
  e->wait_group(job, 7);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(100));
  CHECK_THROWS(e->wait_group(job + 100, 0));
}

TEST(concurrent_submitters_and_one_collector_move_exact_bytes) {
  using namespace contract;
  const char* env = std::getenv("FLEXKV_CONTRACT_SEED");
  const uint32_t seed = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10))
                                       : static_cast<uint32_t>(std::random_device{}());
  std::printf("  seed %u (FLEXKV_CONTRACT_SEED=%u repeats it)\n", seed, seed);
  constexpr int kSubmitters = 3;
  constexpr int64_t kSources = 64, kPerSubmitter = 48;  // read-only sources, then each submitter's destinations
  constexpr int64_t kBlocks = kSources + kSubmitters * kPerSubmitter;
  Rig rig(kBlocks, kBlocks, 4096 + 32, seed);
  auto e = make_engine(2);
  const int32_t layout = rig.attach(*e);

  struct Record {
    CopyDirection dir;
    std::vector<int64_t> src, dst;
    int submitter;
  };
  std::mutex mu;
  std::condition_variable freed;
  std::map<uint64_t, Record> records;  // by tag
  std::map<uint64_t, uint64_t> job_of_tag, collected_job_of_tag;
  std::vector<std::vector<int64_t>> free_dst(kSubmitters);
  for (int s = 0; s < kSubmitters; ++s) free_dst[s] = iota_ids(kSources + s * kPerSubmitter, kPerSubmitter);
  std::atomic<uint64_t> next_tag{1};
  std::atomic<int> submitters_left{kSubmitters};
  std::atomic<int> bad{0};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);

  auto submitter = [&](int me) {
    std::mt19937 rng(seed * 31 + me);
    while (std::chrono::steady_clock::now() < deadline) {
      const size_t k = 1 + rng() % 8;
      Record r;
      r.submitter = me;
      r.dir = rng() % 2 ? CopyDirection::kHostToEngine : CopyDirection::kEngineToHost;
      {
        std::unique_lock<std::mutex> lk(mu);
        freed.wait(lk, [&] { return free_dst[me].size() >= k; });
        std::shuffle(free_dst[me].begin(), free_dst[me].end(), rng);
        r.dst.assign(free_dst[me].end() - k, free_dst[me].end());
        free_dst[me].resize(free_dst[me].size() - k);
      }
      for (size_t i = 0; i < k; ++i) r.src.push_back(static_cast<int64_t>(rng() % kSources));
      for (int64_t d : r.dst) {
        if (r.dir == CopyDirection::kHostToEngine) {
          rig.poison_engine(d);
        } else {
          rig.poison_host(d);
        }
      }
      const uint64_t tag = next_tag++;
      const bool to_engine = r.dir == CopyDirection::kHostToEngine;
      const std::vector<int64_t> eng = to_engine ? r.dst : r.src, hst = to_engine ? r.src : r.dst;
      {
        std::lock_guard<std::mutex> g(mu);
        records[tag] = r;
      }
      const uint64_t job = e->submit(r.dir, layout, eng.data(), hst.data(), k, rng() % 4 == 0, rng() % 2 == 0, tag);
      std::lock_guard<std::mutex> g(mu);
      job_of_tag[tag] = job;
    }
    --submitters_left;
  };
  std::thread collector([&] {
    for (;;) {
      auto c = e->next_completion(100'000);
      if (!c) {
        if (submitters_left.load() == 0 && e->in_flight() == 0) {
          std::lock_guard<std::mutex> g(mu);
          if (collected_job_of_tag.size() == job_of_tag.size()) return;
        }
        continue;
      }
      Record r;
      {
        std::lock_guard<std::mutex> g(mu);
        r = records.at(c->tag);
        if (!collected_job_of_tag.emplace(c->tag, c->job).second) ++bad;  // a tag handed back twice
      }
      bool ok = c->error.empty();
      for (size_t i = 0; i < r.dst.size() && ok; ++i) {
        // Sources are read-only blocks: the mirror of engine sources never changes.
        ok = r.dir == CopyDirection::kHostToEngine ? rig.engine_holds(r.dst[i], r.src[i])
                                                     : rig.host_holds(r.dst[i], r.src[i]);
      }
      if (!ok) {
        std::fprintf(stderr, "  tag %llu (job %llu): wrong bytes or error '%s'\n",
                     static_cast<unsigned long long>(c->tag), static_cast<unsigned long long>(c->job),
                     c->error.c_str());
        ++bad;
      }
      std::lock_guard<std::mutex> g(mu);
      free_dst[r.submitter].insert(free_dst[r.submitter].end(), r.dst.begin(), r.dst.end());
      freed.notify_all();
    }
  });
  std::vector<std::thread> threads;
  for (int s = 0; s < kSubmitters; ++s) threads.emplace_back(submitter, s);
  for (auto& t : threads) t.join();
  collector.join();
  CHECK_EQ(bad.load(), 0);
  CHECK(collected_job_of_tag == job_of_tag);  // every job once, with its own tag
  CHECK(job_of_tag.size() > 10);
  std::printf("  %zu jobs checked\n", job_of_tag.size());
}
