// SsdStore scan and restore: a reopened store finds exactly the blocks written (less those invalidated),
// and a store of another fingerprint, geometry or block size finds none of them.
#include "ssd_store_harness.h"

TEST(a_store_with_other_geometry_or_block_size_finds_nothing) {
  TempDir dir;
  {
    SsdStore store(options({dir.path}, 8, 8192, 16, "same-fp"), env_of(0));
    Blocks b(4, 8192, 16, 1);
    std::vector<SsdBlock> w;
    for (size_t i = 0; i < 4; ++i) w.push_back(b.at(i, static_cast<int32_t>(i)));
    CHECK(all(write_blocks(store, w), SsdStatus::kOk));
  }
  // Same fingerprint, other payload size: the headers say 8192, so nothing is returned.
  SsdStore other(options({dir.path}, 8, 4096, 16, "same-fp"), env_of(0));
  CHECK(other.scan().empty());
}

TEST(scan_after_reopen_returns_exactly_the_written_entries) {
  TempDir a, b;
  Blocks blk(30, 4096, 64, 31);
  std::vector<SsdBlock> w;
  std::vector<SsdEntry> want;
  for (size_t i = 0; i < 30; ++i) {
    const int32_t slot = static_cast<int32_t>((i * 37) % 200);
    w.push_back(blk.at(i, slot));
    want.push_back({slot, blk.keys[i], blk.parents[i], blk.positions[i]});
  }
  std::sort(want.begin(), want.end(), [](const SsdEntry& x, const SsdEntry& y) { return x.slot < y.slot; });
  std::string our_subdir;
  {
    SsdStore store(options({a.path, b.path}, 200, 4096, 64, "model-A"), env_of(1));
    CHECK(all(write_blocks(store, w), SsdStatus::kOk));
    CHECK(store.foreign_subdirs().empty());
    our_subdir = subdir_of(a.path);
  }
  auto same = [&](const std::vector<SsdEntry>& got) {
    if (got.size() != want.size()) return false;
    for (size_t i = 0; i < got.size(); ++i) {
      if (got[i].slot != want[i].slot || got[i].key != want[i].key || got[i].parent != want[i].parent ||
          got[i].position != want[i].position) {
        return false;
      }
    }
    return true;
  };
  {
    SsdStore store(options({a.path, b.path}, 200, 4096, 64, "model-A"), env_of(0));
    CHECK(same(store.scan()));
    // invalidate hides slots from scan, and reads of them fail.
    std::vector<int32_t> gone = {want[0].slot, want[5].slot};
    store.invalidate(gone.data(), gone.size());
    std::vector<SsdEntry> left = store.scan();
    CHECK_EQ(left.size(), want.size() - 2);
    for (const SsdEntry& e : left) CHECK(e.slot != gone[0] && e.slot != gone[1]);
    for (size_t i = 0; i < 30; ++i) {
      if (w[i].slot == gone[0]) CHECK(read_blocks(store, {w[i]})[0] == SsdStatus::kMismatch);
    }
    CHECK_THROWS(store.invalidate(std::vector<int32_t>{200}.data(), 1));
    want.erase(want.begin() + 5);
    want.erase(want.begin());
  }
  {
    // Another fingerprint: its own subdirectory, nothing found, ours listed and left alone.
    SsdStore other(options({a.path, b.path}, 200, 4096, 64, "model-B"), env_of(0));
    CHECK(other.scan().empty());
    std::vector<std::string> foreign = other.foreign_subdirs();
    CHECK_EQ(foreign.size(), 2u);
    CHECK(std::find(foreign.begin(), foreign.end(), our_subdir) != foreign.end());
    Blocks x(1, 4096, 64, 99);
    CHECK(all(write_blocks(other, {x.at(0, want[0].slot)}), SsdStatus::kOk));
  }
  SsdStore store(options({a.path, b.path}, 200, 4096, 64, "model-A"), env_of(0));
  CHECK(same(store.scan()));
  CHECK_EQ(store.foreign_subdirs().size(), 2u);  // model-B's now
  // A smaller store on the same files sees only its slots.
  SsdStore small(options({a.path, b.path}, 100, 4096, 64, "model-A"), env_of(0));
  for (const SsdEntry& e : small.scan()) CHECK(e.slot < 100);
}

TEST_MAIN()
