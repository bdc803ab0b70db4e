#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "transfer/copy_engine.h"

using flexkv::CopyDirection;
using flexkv::CopyEngine;

namespace {

// Registers the host region and the layout, copies, and forgets the layout again.
void copy(CopyEngine& eng, CopyDirection dir, const flexkv::EngineLayout& layout, const flexkv::HostRegion& host,
          const int64_t* engine_blocks, const int64_t* host_blocks, size_t n) {
  eng.register_host(host.base, host.block_bytes * static_cast<uint64_t>(host.num_blocks));
  const int32_t id = eng.register_layout(layout, host);
  std::string error;
  const bool done = eng.wait(eng.submit(dir, id, engine_blocks, host_blocks, n, false, false, 0), -1, &error);
  CHECK(done && error.empty());
  eng.unregister_layout(id);
}

// Engine memory: 2 layers, K and V per layer in separate arrays of `nb` blocks
// of `chunk` bytes (a vLLM-like per-layer [2, num_blocks, ...] layout).
struct Engine {
  size_t nb, chunk;
  std::vector<std::vector<uint8_t>> kv;  // 4 arrays: l0k, l0v, l1k, l1v
  flexkv::EngineLayout layout() {
    flexkv::EngineLayout l;
    l.num_blocks = static_cast<int64_t>(nb);
    for (size_t s = 0; s < kv.size(); ++s) {
      l.segments.push_back({reinterpret_cast<uint64_t>(kv[s].data()), static_cast<int64_t>(chunk), s * chunk, chunk});
    }
    return l;
  }
};

Engine make_engine(size_t nb, size_t chunk, uint32_t seed) {
  std::mt19937 rng(seed);
  Engine e{nb, chunk, {}};
  for (int s = 0; s < 4; ++s) {
    std::vector<uint8_t> v(nb * chunk);
    for (auto& x : v) x = static_cast<uint8_t>(rng());
    e.kv.push_back(std::move(v));
  }
  return e;
}

}  // namespace

TEST(round_trip_is_byte_exact) {
  for (int threads : {1, 2, 3}) {
    Engine e = make_engine(64, 48, 7 + threads);
    auto original = e.kv;
    std::vector<uint8_t> host(32 * 4 * 48, 0);
    flexkv::HostRegion region{reinterpret_cast<uint64_t>(host.data()), 4 * 48, 32};
    auto eng = flexkv::make_host_copy_engine(threads);
    std::vector<int64_t> eblocks{5, 63, 0, 17, 18, 19, 2};
    std::vector<int64_t> hblocks{31, 0, 7, 8, 9, 10, 1};
    copy(*eng, CopyDirection::kEngineToHost, e.layout(), region, eblocks.data(), hblocks.data(), eblocks.size());
    // Host block layout: [layer][k|v] chunks back to back.
    for (size_t i = 0; i < eblocks.size(); ++i)
      for (size_t s = 0; s < 4; ++s)
        CHECK(std::memcmp(host.data() + hblocks[i] * 4 * 48 + s * 48, original[s].data() + eblocks[i] * 48, 48) == 0);
    for (auto& v : e.kv) std::memset(v.data(), 0xEE, v.size());  // poison
    std::vector<int64_t> dst{1, 2, 3, 4, 5, 6, 7};
    const int32_t id = eng->register_layout(e.layout(), region);
    const uint64_t job =
        eng->submit(CopyDirection::kHostToEngine, id, dst.data(), hblocks.data(), dst.size(), false, false, 0);
    CHECK(eng->wait(job, -1));
    for (size_t i = 0; i < dst.size(); ++i)
      for (size_t s = 0; s < 4; ++s)
        CHECK(std::memcmp(e.kv[s].data() + dst[i] * 48, original[s].data() + eblocks[i] * 48, 48) == 0);
    CHECK(e.kv[0][0] == 0xEE);  // block 0 was not a destination
  }
}

TEST(bad_arguments_throw_before_copying) {
  Engine e = make_engine(4, 16, 1);
  std::vector<uint8_t> host(4 * 64, 0);
  flexkv::HostRegion region{reinterpret_cast<uint64_t>(host.data()), 64, 4};
  auto eng = flexkv::make_host_copy_engine(2);
  std::vector<int64_t> ok{0}, bad_engine{4}, bad_host{-1};
  CHECK_THROWS(eng->register_layout(e.layout(), region));  // the host region is not registered yet
  eng->register_host(region.base, host.size());
  const int32_t id = eng->register_layout(e.layout(), region);
  CHECK_THROWS(eng->submit(CopyDirection::kEngineToHost, id, bad_engine.data(), ok.data(), 1, false, false, 0));
  CHECK_THROWS(eng->submit(CopyDirection::kEngineToHost, id, ok.data(), bad_host.data(), 1, false, false, 0));
  flexkv::HostRegion small{reinterpret_cast<uint64_t>(host.data()), 32, 4};  // segments do not fit
  CHECK_THROWS(eng->register_layout(e.layout(), small));
  flexkv::EngineLayout empty = e.layout();
  empty.segments[2].bytes = 0;
  CHECK_THROWS(eng->register_layout(empty, region));
  CHECK_THROWS(eng->register_host(region.base + 8, host.size()));  // overlaps without lying inside
  CHECK_THROWS(eng->wait(12345, 0));
  for (uint8_t b : host) CHECK_EQ(b, 0);
}

TEST(many_jobs_in_flight_complete) {
  Engine e = make_engine(256, 64, 3);
  std::vector<uint8_t> host(256 * 256, 0);
  flexkv::HostRegion region{reinterpret_cast<uint64_t>(host.data()), 256, 256};
  auto eng = flexkv::make_host_copy_engine(2);
  eng->register_host(region.base, host.size());
  const int32_t id = eng->register_layout(e.layout(), region);
  std::vector<uint64_t> jobs;
  std::vector<std::vector<int64_t>> ids;
  for (int j = 0; j < 16; ++j) {
    std::vector<int64_t> b;
    for (int i = 0; i < 16; ++i) b.push_back(j * 16 + i);
    ids.push_back(b);
  }
  for (auto& b : ids) {
    jobs.push_back(eng->submit(CopyDirection::kEngineToHost, id, b.data(), b.data(), b.size(), false, false, 0));
  }
  for (uint64_t j : jobs) CHECK(eng->wait(j, -1));
  for (size_t b = 0; b < 256; ++b)
    CHECK(std::memcmp(host.data() + b * 256 + 3 * 64, e.kv[3].data() + b * 64, 64) == 0);
}

TEST(large_chunks_use_streaming_stores_and_stay_exact) {
  // 16 KiB + 40 bytes: the streaming path with a tail, to aligned and unaligned destinations.
  const size_t chunk = 16 * 1024 + 40;
  Engine e = make_engine(16, chunk, 9);
  for (size_t misalign : {size_t{0}, size_t{8}}) {
    std::vector<uint8_t> raw(16 * 4 * chunk + 64, 0);
    uint8_t* base = raw.data() + ((64 - reinterpret_cast<uintptr_t>(raw.data()) % 64) % 64) + misalign;
    flexkv::HostRegion region{reinterpret_cast<uint64_t>(base), 4 * chunk, 15};
    auto eng = flexkv::make_host_copy_engine(2);
    std::vector<int64_t> eb{3, 0, 15, 7}, hb{14, 2, 0, 9};
    copy(*eng, CopyDirection::kEngineToHost, e.layout(), region, eb.data(), hb.data(), eb.size());
    for (size_t i = 0; i < eb.size(); ++i)
      for (size_t s = 0; s < 4; ++s)
        CHECK(std::memcmp(base + hb[i] * 4 * chunk + s * chunk, e.kv[s].data() + eb[i] * chunk, chunk) == 0);
  }
}

TEST(small_jobs_are_done_on_submit_and_large_ones_by_the_threads) {
  // 4 segments of 64 KiB a block: 4 blocks (1 MiB) are copied by submit itself, 24 blocks (6 MiB) in claims by
  // the copy threads; both byte-exact into poisoned destinations, with every thread count.
  const size_t chunk = 64 * 1024;
  for (int threads : {1, 2, 3}) {
    Engine e = make_engine(32, chunk, 21 + threads);
    auto original = e.kv;
    std::vector<uint8_t> host(32 * 4 * chunk);
    for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint8_t>(i * 131 + 7 + (i >> 16));
    flexkv::HostRegion region{reinterpret_cast<uint64_t>(host.data()), 4 * chunk, 32};
    auto eng = flexkv::make_host_copy_engine(threads);
    eng->register_host(region.base, host.size());
    const int32_t id = eng->register_layout(e.layout(), region);
    std::vector<int64_t> small_e{9, 1, 30, 4}, small_h{0, 31, 2, 17};
    const uint64_t small =
        eng->submit(CopyDirection::kEngineToHost, id, small_e.data(), small_h.data(), small_e.size(), false, false, 7);
    std::string error;
    CHECK(eng->wait(small, 0, &error) && error.empty());  // done before submit returned
    std::vector<int64_t> large_e, large_h;
    for (int64_t b = 0; b < 24; ++b) {
      large_e.push_back((b * 7 + 3) % 32);
      large_h.push_back(31 - b);
    }
    for (auto& v : e.kv) std::memset(v.data(), 0xEE, v.size());  // poisoned destinations for the load back
    const uint64_t large =
        eng->submit(CopyDirection::kHostToEngine, id, large_e.data(), large_h.data(), large_e.size(), true, false, 8);
    CHECK(eng->wait(large, -1, &error) && error.empty());
    for (size_t i = 0; i < small_e.size(); ++i)
      for (size_t s = 0; s < 4; ++s)
        CHECK(std::memcmp(host.data() + small_h[i] * 4 * chunk + s * chunk, original[s].data() + small_e[i] * chunk,
                          chunk) == 0);
    for (size_t i = 0; i < large_e.size(); ++i)
      for (size_t s = 0; s < 4; ++s)
        CHECK(std::memcmp(e.kv[s].data() + large_e[i] * chunk, host.data() + large_h[i] * 4 * chunk + s * chunk,
                          chunk) == 0);
  }
}

TEST_MAIN()
