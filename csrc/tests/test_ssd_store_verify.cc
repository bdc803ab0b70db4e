// SsdStore verification: a corrupted, truncated or torn slot, or a request for another block, reads as
// a mismatch, never as the stored bytes.
#include <set>

#include "ssd_store_harness.h"

TEST(corruption_and_wrong_identity_are_mismatches) {
  TempDir dir;
  const uint64_t bytes = 5000;
  const uint64_t slot = kPage + padded(bytes);
  SsdStore store(options({dir.path}, 16, bytes, 16), env_of(0));
  Blocks b(8, bytes, 16, 11);
  std::vector<SsdBlock> w;
  for (size_t i = 0; i < 8; ++i) w.push_back(b.at(i, static_cast<int32_t>(i)));
  CHECK(all(write_blocks(store, w), SsdStatus::kOk));
  const std::string file = subdir_of(dir.path) + "/blocks-000000.dat";
  flip_byte(file, 1 * slot + kPage + 4999);  // the last payload byte of slot 1
  flip_byte(file, 2 * slot + 30);            // the key in slot 2's header
  flip_byte(file, 3 * slot + 88 + 8 * 15);   // the last token id in slot 3's header
  flip_byte(file, 4 * slot + 3);             // the magic of slot 4
  Buffer out(8, bytes);
  std::vector<SsdBlock> r;
  for (size_t i = 0; i < 8; ++i) r.push_back(b.at(i, static_cast<int32_t>(i), out.at(i)));
  std::vector<SsdStatus> st = read_blocks(store, r);
  CHECK(st[0] == SsdStatus::kOk);
  for (int i = 1; i <= 4; ++i) CHECK(st[static_cast<size_t>(i)] == SsdStatus::kMismatch);
  CHECK(st[5] == SsdStatus::kOk);
  // Headers 2, 3 and 4 are broken, so scan skips them; slot 1's header is intact (read() checks payloads).
  std::set<int32_t> scanned;
  for (const SsdEntry& e : store.scan()) scanned.insert(e.slot);
  CHECK(scanned == std::set<int32_t>({0, 1, 5, 6, 7}));
  // Asking for a block with another key, parent, position or tokens: a mismatch, not the stored bytes.
  auto wrong = [&](auto&& change) {
    SsdBlock blk = b.at(6, 6, out.at(6));
    std::vector<int64_t> tokens(b.tokens.begin() + 6 * 16, b.tokens.begin() + 7 * 16);
    blk.tokens = tokens.data();
    change(blk, tokens);
    return read_blocks(store, {blk})[0];
  };
  CHECK(wrong([](SsdBlock&, std::vector<int64_t>&) {}) == SsdStatus::kOk);
  CHECK(wrong([](SsdBlock& x, std::vector<int64_t>&) { x.key.hi ^= 1; }) == SsdStatus::kMismatch);
  CHECK(wrong([](SsdBlock& x, std::vector<int64_t>&) { x.parent.lo ^= 1; }) == SsdStatus::kMismatch);
  CHECK(wrong([](SsdBlock& x, std::vector<int64_t>&) { x.position += 1; }) == SsdStatus::kMismatch);
  CHECK(wrong([](SsdBlock&, std::vector<int64_t>& t) { t[9] += 1; }) == SsdStatus::kMismatch);
  CHECK(wrong([](SsdBlock& x, std::vector<int64_t>&) { x.slot = 7; }) == SsdStatus::kMismatch);
}

TEST(truncated_file_reads_as_mismatch) {
  TempDir dir;
  const uint64_t bytes = 8192;
  const uint64_t slot = kPage + bytes;
  auto env = env_of(0);
  Blocks b(6, bytes, 16, 21);
  Buffer out(6, bytes);
  std::vector<SsdBlock> w, r;
  for (size_t i = 0; i < 6; ++i) {
    w.push_back(b.at(i, static_cast<int32_t>(i)));
    r.push_back(b.at(i, static_cast<int32_t>(i), out.at(i)));
  }
  {
    SsdStore store(options({dir.path}, 6, bytes, 16), env);
    CHECK(all(write_blocks(store, w), SsdStatus::kOk));
    // Cut the file inside slot 3's payload (not at a 4096 boundary).
    CHECK_EQ(::truncate((subdir_of(dir.path) + "/blocks-000000.dat").c_str(), static_cast<off_t>(3 * slot + 5000)), 0);
    std::vector<SsdStatus> st = read_blocks(store, r);
    CHECK(st[0] == SsdStatus::kOk && st[1] == SsdStatus::kOk && st[2] == SsdStatus::kOk);
    for (size_t i = 3; i < 6; ++i) CHECK(st[i] == SsdStatus::kMismatch);
    // One block at a time too (a request that starts past the end).
    for (size_t i = 3; i < 6; ++i) CHECK(read_blocks(store, {r[i]})[0] == SsdStatus::kMismatch);
    CHECK_EQ(store.scan().size(), 4u);  // slot 3's header lies before the cut
  }
  // Reopened: the file is extended again with zeros, the lost slots stay lost, the others are intact.
  SsdStore again(options({dir.path}, 6, bytes, 16), env);
  CHECK_EQ(again.scan().size(), 4u);
  std::vector<SsdStatus> st = read_blocks(again, r);
  CHECK(st[0] == SsdStatus::kOk && st[2] == SsdStatus::kOk && st[3] == SsdStatus::kMismatch);
  CHECK(st[5] == SsdStatus::kMismatch);
}

TEST(torn_header_or_stale_payload_is_caught) {
  TempDir dir;
  const uint32_t tpb = 1024;  // a 12 KiB header: it can tear between its pages
  const uint64_t bytes = 8192;
  SsdStore store(options({dir.path}, 4, bytes, tpb), env_of(0));
  const uint64_t hdr = 3 * kPage;
  const uint64_t slot = hdr + bytes;
  CHECK_EQ(store.slot_bytes(), slot);
  const std::string file = subdir_of(dir.path) + "/blocks-000000.dat";
  Blocks a(1, bytes, tpb, 51), b(1, bytes, tpb, 52);
  Buffer out(1, bytes);
  CHECK(all(write_blocks(store, {a.at(0, 0)}), SsdStatus::kOk));
  const std::vector<uint8_t> old_header = file_bytes(file, 0, hdr);
  const std::vector<uint8_t> old_last_page = file_bytes(file, 2 * kPage, kPage);
  CHECK(all(write_blocks(store, {b.at(0, 0)}), SsdStatus::kOk));
  CHECK(read_blocks(store, {b.at(0, 0, out.at(0))})[0] == SsdStatus::kOk);
  // The header's last page from the old write, the rest new: the header checksum fails.
  put_bytes(file, 2 * kPage, old_last_page);
  CHECK(read_blocks(store, {b.at(0, 0, out.at(0))})[0] == SsdStatus::kMismatch);
  CHECK(read_blocks(store, {a.at(0, 0, out.at(0))})[0] == SsdStatus::kMismatch);
  CHECK(store.scan().empty());
  // The whole old header over the new payload: a valid header, but the payload checksum fails.
  put_bytes(file, 0, old_header);
  CHECK_EQ(store.scan().size(), 1u);
  CHECK(read_blocks(store, {a.at(0, 0, out.at(0))})[0] == SsdStatus::kMismatch);
  CHECK(read_blocks(store, {b.at(0, 0, out.at(0))})[0] == SsdStatus::kMismatch);
}

TEST_MAIN()
