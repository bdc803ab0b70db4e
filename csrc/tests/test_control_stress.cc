// Two scheduler threads drive one control plane (CPU tier small enough to
// evict all the time, an SSD tier behind it) with random gets, puts, cancels,
// external copies, prefetches and bad launches while its completion and SSD
// threads run. After every step: the indexes are consistent (no block both
// free and locked, no stale key, no lost block); every load is byte-exact
// against content derived from the block's key; at the end no task is left
// and nothing is locked.
//
//   FLEXKV_STRESS_SECONDS=180 ./test_control_stress     (default: 4 seconds)
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "control/control_plane.h"
#include "flexkv/errors.h"

using namespace flexkv;

namespace {

constexpr int kTpb = 4;
constexpr int64_t kChunk = 256;                    // bytes of one layer of one block
constexpr int64_t kBlockBytes = 2 * kChunk;        // two layers
constexpr int64_t kEngineBlocks = 256;             // thread t owns engine blocks [128 t, 128 t + 128)
constexpr size_t kPrompts = 24;
constexpr size_t kPromptTokens = 48;               // 12 blocks

// The bytes every copy of the block named `key` holds.
void content(const BlockKey& key, uint8_t* out) {
  std::mt19937_64 rng(key.lo ^ (key.hi * 0x9E3779B97F4A7C15ull));
  for (int64_t i = 0; i < kBlockBytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(out + i, &v, 8);
  }
}

struct Engine {
  // Two layers in two buffers: each block is two segments, as per-layer engine caches are.
  std::vector<uint8_t> layer0 = std::vector<uint8_t>(kEngineBlocks * kChunk);
  std::vector<uint8_t> layer1 = std::vector<uint8_t>(kEngineBlocks * kChunk);
  EngineLayout layout() {
    EngineLayout l;
    l.num_blocks = kEngineBlocks;
    l.segments.push_back({reinterpret_cast<uint64_t>(layer0.data()), kChunk, 0, kChunk, 0});
    l.segments.push_back({reinterpret_cast<uint64_t>(layer1.data()), kChunk, kChunk, kChunk, 1});
    return l;
  }
  void write(int64_t b, const uint8_t* bytes) {
    std::memcpy(&layer0[b * kChunk], bytes, kChunk);
    std::memcpy(&layer1[b * kChunk], bytes + kChunk, kChunk);
  }
  bool holds(int64_t b, const uint8_t* bytes) const {
    return std::memcmp(&layer0[b * kChunk], bytes, kChunk) == 0 &&
           std::memcmp(&layer1[b * kChunk], bytes + kChunk, kChunk) == 0;
  }
  void poison(int64_t b) {
    std::memset(&layer0[b * kChunk], 0xA5, kChunk);
    std::memset(&layer1[b * kChunk], 0xA5, kChunk);
  }
};

struct Shared {
  std::shared_ptr<ControlPlane> plane;
  Engine engine;
  int32_t layout = -1;
  std::vector<std::vector<int64_t>> prompts;
  std::atomic<int64_t> loads{0}, stores{0}, cancels{0}, externals{0}, refused{0}, failures{0}, steps{0};
};

bool ended_ok(const Report& r) { return r.status == ReportStatus::kSuccess; }

Report wait_one(ControlPlane& p, TaskId id) {
  Report r = p.wait({id}, 60.0, false).front();
  if (r.status == ReportStatus::kTimeout) std::fprintf(stderr, "task %llu did not end in 60 s\n", (unsigned long long)id);
  return r;
}

void scheduler(Shared& s, int thread, unsigned seed, double seconds) {
  std::mt19937 rng(seed);
  ControlPlane& p = *s.plane;
  const BlockKey seed_key = p.seed("", {});
  const int64_t base = 128 * thread;
  std::vector<uint8_t> bytes(kBlockBytes);
  const auto stop = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < stop) {
    const auto& prompt = s.prompts[rng() % s.prompts.size()];
    const size_t n_tokens = kTpb * (1 + rng() % (kPromptTokens / kTpb));
    auto run = p.token_run(seed_key, prompt.data(), n_tokens);
    const size_t first = rng() % 4 == 0 ? rng() % run->size() : 0;
    // Engine blocks of this step: block i of the run goes to engine block base + (offset + i) % 128.
    const int64_t offset = rng() % 128;
    auto engine_block = [&](int64_t i) { return base + (offset + i) % 128; };
    const int op = static_cast<int>(rng() % 10);
    try {
      if (op < 3) {  // put
        const Match m = p.put_match(run, first, n_tokens);
        std::vector<int64_t> src;
        for (int64_t i : m.blocks) {
          content(run->keys[static_cast<size_t>(i)], bytes.data());
          s.engine.write(engine_block(i), bytes.data());
          src.push_back(engine_block(i));
        }
        if (!src.empty()) p.launch({m.task}, {EngineTargets{src.data(), src.size(), false, ""}}, s.layout, false);
        const Report r = wait_one(p, m.task);
        CHECK(ended_ok(r));
        s.stores += static_cast<int64_t>(m.blocks.size());
      } else if (op < 6) {  // get, byte-exact
        const Match m = p.get_match(run, first, n_tokens);
        std::vector<int64_t> dst;
        for (int64_t i : m.blocks) {
          s.engine.poison(engine_block(i));
          dst.push_back(engine_block(i));
        }
        if (!dst.empty()) p.launch({m.task}, {EngineTargets{dst.data(), dst.size(), false, ""}}, s.layout, false);
        const Report r = wait_one(p, m.task);
        CHECK(r.status == ReportStatus::kSuccess || r.status == ReportStatus::kFailed);
        if (r.status == ReportStatus::kFailed) ++s.failures;
        for (int64_t i : r.blocks) {  // what it says arrived did arrive, and is the block's own bytes
          content(run->keys[static_cast<size_t>(i)], bytes.data());
          if (!s.engine.holds(engine_block(i), bytes.data())) {
            std::fprintf(stderr, "thread %d: block %lld of a load differs\n", thread, (long long)i);
            CHECK(false);
          }
        }
        s.loads += static_cast<int64_t>(r.blocks.size());
      } else if (op == 6) {  // cancel before launch
        const Match m = rng() % 2 ? p.get_match(run, first, n_tokens) : p.put_match(run, first, n_tokens);
        p.cancel({m.task});
        const Report r = wait_one(p, m.task);
        CHECK(r.status == ReportStatus::kCancelled || (r.status == ReportStatus::kSuccess && m.blocks.empty()) ||
              r.status == ReportStatus::kFailed);
        ++s.cancels;
      } else if (op == 7) {  // a copy made elsewhere: take, copy by hand from the tier, complete
        const Match m = p.get_match(run, first, n_tokens);
        const Taken t = p.take(m.task, rng() % 2 ? 0.0 : 5.0);
        p.complete(m.task, true, "");
        ++s.externals;
      } else if (op == 8) {  // prefetch
        const TaskId id = p.prefetch(run, n_tokens);
        const Report r = wait_one(p, id);
        CHECK(r.status == ReportStatus::kSuccess || r.status == ReportStatus::kFailed);
      } else {  // a launch with a bad engine block: refused, the task ends, nothing stays locked
        const Match m = p.get_match(run, first, n_tokens);
        std::vector<int64_t> bad(m.blocks.size(), kEngineBlocks + 7);
        if (!bad.empty()) {
          bool threw = false;
          try {
            p.launch({m.task}, {EngineTargets{bad.data(), bad.size(), false, ""}}, s.layout, false);
          } catch (const TaskError&) {
            threw = true;
          }
          CHECK(threw);
          ++s.refused;
        }
        const Report r = wait_one(p, m.task);
        CHECK(r.status != ReportStatus::kTimeout && r.status != ReportStatus::kUnready);
      }
      p.lookup(*run);
      p.check_consistency();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "thread %d: unexpected %s\n", thread, e.what());
      CHECK(false);
      return;
    }
    ++s.steps;
  }
}

}  // namespace

TEST(two_schedulers_random_tasks_keep_every_invariant) {
  const char* env = std::getenv("FLEXKV_STRESS_SECONDS");
  const double seconds = env ? std::atof(env) : 4.0;
  const unsigned seed = std::random_device{}();
  std::printf("seed %u, %.0f s\n", seed, seconds);
  const auto dir = std::filesystem::temp_directory_path() / ("flexkv-stress-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  Shared s;
  ControlPlaneOptions o;
  o.model_fingerprint = "stress";
  o.block_bytes = kBlockBytes;
  o.num_layers = 2;
  o.tokens_per_block = kTpb;
  o.num_cpu_blocks = 40;  // a prompt is 12 blocks: the CPU tier evicts all the time
  o.evict_ratio = 0.05;
  o.enable_ssd = true;
  o.num_ssd_blocks = 160;
  o.ssd_cache_dirs = {dir.string()};
  o.ssd_io_engine = "threads";
  s.plane = ControlPlane::open(o);
  s.layout = s.plane->register_layout(s.engine.layout(), -1);
  std::mt19937 rng(seed);
  for (size_t i = 0; i < kPrompts; ++i) {
    std::vector<int64_t> t(kPromptTokens);
    for (auto& x : t) x = rng() % 50000;
    if (i % 3 && i > 0) std::copy_n(s.prompts[i - 1].begin(), kTpb * (1 + rng() % 6), t.begin());  // shared prefixes
    s.prompts.push_back(std::move(t));
  }
  std::thread a([&] { scheduler(s, 0, seed + 1, seconds); });
  std::thread b([&] { scheduler(s, 1, seed + 2, seconds); });
  a.join();
  b.join();
  CHECK(s.plane->flush(60.0));
  CHECK(s.plane->tasks_in_flight() == 0);
  CHECK(s.plane->locked_blocks() == std::make_pair(int64_t{0}, int64_t{0}));
  s.plane->check_consistency();
  std::printf("%lld steps: %lld blocks loaded byte-exact, %lld stored, %lld cancels, %lld external copies, "
              "%lld bad launches refused, %lld loads that verified short\n",
              (long long)s.steps, (long long)s.loads, (long long)s.stores, (long long)s.cancels,
              (long long)s.externals, (long long)s.refused, (long long)s.failures);
  CHECK(s.loads > 0 && s.stores > 0);
  s.plane->shutdown();
  std::filesystem::remove_all(dir);
}

TEST_MAIN()
