// SsdStore I/O: byte-exact round trips over block sizes, envs and several directories and files,
// neighbouring slots in one request, threads on disjoint slots, and bad arguments refused before any I/O.
#include <thread>

#include "ssd_store_harness.h"

TEST(round_trip_is_byte_exact_for_block_sizes_and_envs) {
  for (int kind = 0; kind < 2; ++kind) {
    for (uint64_t bytes : {uint64_t{4096}, uint64_t{5000}, uint64_t{256} << 10}) {
      for (uint32_t tpb : {16u, 64u}) {
        TempDir dir;
        SsdStore store(options({dir.path}, 64, bytes, tpb), env_of(kind));
        CHECK_EQ(store.slot_bytes(), kPage + padded(bytes));
        CHECK_EQ(store.io_env_name(), kind == 0 ? "io_uring" : "threads");
        Blocks b(24, bytes, tpb, static_cast<uint32_t>(bytes + tpb + kind));
        // Consecutive runs (3..10, 40..47) and scattered slots, in no particular order.
        const std::vector<int32_t> slots = {7, 3, 4, 5, 6, 8, 9, 10, 63, 0, 20, 33, 40, 41, 42, 43,
                                            44, 45, 46, 47, 12, 58, 25, 30};
        std::vector<SsdBlock> w, r;
        Buffer out(b.n, bytes);
        for (size_t i = 0; i < b.n; ++i) {
          w.push_back(b.at(i, slots[i]));
          r.push_back(b.at(i, slots[i], out.at(i)));
        }
        CHECK(all(write_blocks(store, w), SsdStatus::kOk));
        CHECK(all(read_blocks(store, r), SsdStatus::kOk));
        for (size_t i = 0; i < b.n; ++i) CHECK(std::memcmp(out.at(i), b.data(i), bytes) == 0);
        // Never-written slots are not blocks.
        std::vector<SsdBlock> empty = {b.at(0, 1, out.at(0)), b.at(1, 62, out.at(1))};
        CHECK(all(read_blocks(store, empty), SsdStatus::kMismatch));
      }
    }
  }
}

TEST(several_dirs_and_split_files) {
  TempDir a, b, c;
  const uint64_t bytes = 10000;
  const uint64_t slot = kPage + padded(bytes);
  // Each directory's 17 or 16 slots in files of 5 slots (the size is not a multiple of a slot).
  SsdStore store(options({a.path, b.path, c.path}, 50, bytes, 16, "fp", 5 * slot + 123), env_of(0));
  CHECK_EQ(count_files(subdir_of(a.path)), 4u);  // ceil(17 / 5)
  CHECK_EQ(count_files(subdir_of(c.path)), 4u);  // ceil(16 / 5)
  struct stat st;
  CHECK(::stat((subdir_of(a.path) + "/blocks-000003.dat").c_str(), &st) == 0);
  CHECK_EQ(static_cast<uint64_t>(st.st_size), 2 * slot);  // the last file holds only the 2 slots left
  Blocks blk(50, bytes, 16, 3);
  std::vector<SsdBlock> w, r;
  Buffer out(50, bytes);
  for (int32_t s = 0; s < 50; ++s) {  // every slot, consecutive: runs cross file boundaries
    w.push_back(blk.at(static_cast<size_t>(s), 49 - s));
    r.push_back(blk.at(static_cast<size_t>(s), 49 - s, out.at(static_cast<size_t>(s))));
  }
  CHECK(all(write_blocks(store, w), SsdStatus::kOk));
  CHECK(all(read_blocks(store, r), SsdStatus::kOk));
  for (size_t i = 0; i < 50; ++i) CHECK(std::memcmp(out.at(i), blk.data(i), bytes) == 0);
  // Slot 4 lives in dirs[1], local slot 1, first file, offset 1 slot.
  const std::vector<uint8_t> hdr = file_bytes(subdir_of(b.path) + "/blocks-000000.dat", slot, 8);
  CHECK(std::memcmp(hdr.data(), "FLEXKVB1", 8) == 0);
  CHECK_EQ(store.scan().size(), 50u);
}

TEST(neighbouring_slots_move_in_one_request) {
  TempDir a, b;
  auto counting = std::make_shared<CountingEnv>(flexkv::make_uring_env(32));
  SsdStore store(options({a.path, b.path}, 100, 8192, 16, "fp", 0), counting);
  Blocks blk(20, 8192, 16, 5);
  std::vector<SsdBlock> run, scattered;
  for (size_t i = 0; i < 10; ++i) run.push_back(blk.at(i, static_cast<int32_t>(20 + 2 * i)));  // dir 0, local 10..19
  for (size_t i = 10; i < 20; ++i) scattered.push_back(blk.at(i, static_cast<int32_t>((7 * i) % 100)));
  counting->requests = 0;
  counting->iovecs = 0;
  CHECK(all(write_blocks(store, run), SsdStatus::kOk));
  CHECK_EQ(counting->requests.load(), 1u);  // one writev
  CHECK_EQ(counting->iovecs.load(), 20u);   // header + payload per block
  counting->requests = 0;
  CHECK(all(read_blocks(store, run), SsdStatus::kOk));
  CHECK_EQ(counting->requests.load(), 1u);
  counting->requests = 0;
  CHECK(all(write_blocks(store, scattered), SsdStatus::kOk));  // 70, 77, 84, 91, 98, 5, ...: no neighbours
  CHECK_EQ(counting->requests.load(), 10u);
  // Slots 0..9 over two dirs: two runs of 5.
  Blocks more(10, 8192, 16, 6);
  std::vector<SsdBlock> both;
  for (size_t i = 0; i < 10; ++i) both.push_back(more.at(i, static_cast<int32_t>(9 - i)));
  counting->requests = 0;
  CHECK(all(write_blocks(store, both), SsdStatus::kOk));
  CHECK_EQ(counting->requests.load(), 2u);
  CHECK(all(read_blocks(store, both), SsdStatus::kOk));
  CHECK_EQ(store.io_env_name(), "counting");
}

TEST(threads_write_and_read_disjoint_slots_concurrently) {
  for (int kind = 0; kind < 2; ++kind) {
    TempDir a, b;
    SsdStore store(options({a.path, b.path}, 256, 32 << 10, 16), env_of(kind));
    std::atomic<int> bad{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < 2; ++t) {
      ts.emplace_back([&, t] {
        for (int round = 0; round < 10; ++round) {
          Blocks blk(32, 32 << 10, 16, static_cast<uint32_t>(100 * t + round));
          Buffer out(32, 32 << 10);
          std::vector<SsdBlock> w, r;
          for (size_t i = 0; i < 32; ++i) {
            // 0..15 neighbours, then 16, 19, ..., 61; halves of 128 slots per thread, alternating rounds.
            const size_t off = i < 16 ? i : 16 + 3 * (i - 16);
            const int32_t slot = static_cast<int32_t>(t * 128 + (round % 2) * 64 + static_cast<int>(off));
            w.push_back(blk.at(i, slot));
            r.push_back(blk.at(i, slot, out.at(i)));
          }
          if (!all(write_blocks(store, w), SsdStatus::kOk)) ++bad;
          if (!all(read_blocks(store, r), SsdStatus::kOk)) ++bad;
          for (size_t i = 0; i < 32; ++i) bad += std::memcmp(out.at(i), blk.data(i), 32 << 10) != 0;
        }
      });
    }
    for (auto& t : ts) t.join();
    CHECK_EQ(bad.load(), 0);
  }
}

TEST(bad_arguments_throw_before_any_io) {
  TempDir dir;
  auto counting = std::make_shared<CountingEnv>(flexkv::make_thread_env(1));
  SsdStore store(options({dir.path}, 8, 4096, 16), counting);
  Blocks b(2, 4096, 16, 61);
  counting->requests = 0;
  std::vector<SsdStatus> st(2);
  std::vector<SsdBlock> out_of_range = {b.at(0, 1), b.at(1, 8)};
  CHECK_THROWS(store.write(out_of_range.data(), 2, st.data()));
  CHECK_THROWS(store.read(out_of_range.data(), 2, st.data()));
  std::vector<SsdBlock> negative = {b.at(0, -1)};
  CHECK_THROWS(store.read(negative.data(), 1, st.data()));
  std::vector<SsdBlock> unaligned = {b.at(0, 1, b.data(0) + 8)};
  CHECK_THROWS(store.write(unaligned.data(), 1, st.data()));
  std::vector<SsdBlock> twice = {b.at(0, 3), b.at(1, 3)};
  CHECK_THROWS(store.write(twice.data(), 2, st.data()));
  CHECK_EQ(counting->requests.load(), 0u);
  CHECK(all(read_blocks(store, twice), SsdStatus::kMismatch));  // reading a slot twice is fine
  store.write(nullptr, 0, nullptr);
  store.read(nullptr, 0, nullptr);
  store.invalidate(nullptr, 0);
}

TEST_MAIN()
