#include <fcntl.h>
#include <ftw.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "transfer/io_env.h"
#include "transfer/ssd_store.h"

using flexkv::BlockKey;
using flexkv::IoEnv;
using flexkv::SsdBlock;
using flexkv::SsdEntry;
using flexkv::SsdStatus;
using flexkv::SsdStore;
using flexkv::SsdStoreOptions;

namespace {

constexpr uint64_t kPage = 4096;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/flexkv-test-ssd-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
};

uint64_t padded(uint64_t b) { return (b + kPage - 1) / kPage * kPage; }

// n blocks of random content: keys, parents, positions, tokens and 4096-aligned payloads.
struct Blocks {
  uint32_t tpb;
  uint64_t bytes;
  size_t n;
  std::vector<BlockKey> keys, parents;
  std::vector<int64_t> positions, tokens;
  uint8_t* payload;

  Blocks(size_t n_, uint64_t bytes_, uint32_t tpb_, uint32_t seed) : tpb(tpb_), bytes(bytes_), n(n_) {
    std::mt19937_64 rng(seed);
    payload = static_cast<uint8_t*>(std::aligned_alloc(kPage, n * padded(bytes)));
    for (size_t i = 0; i < n * padded(bytes) / 8; ++i) reinterpret_cast<uint64_t*>(payload)[i] = rng();
    for (size_t i = 0; i < n; ++i) {
      keys.push_back({rng(), rng()});
      parents.push_back(i == 0 ? BlockKey{rng(), rng()} : keys[i - 1]);
      positions.push_back(static_cast<int64_t>(i));
      for (uint32_t t = 0; t < tpb; ++t) tokens.push_back(static_cast<int64_t>(rng() % 150000));
    }
  }
  ~Blocks() { std::free(payload); }
  Blocks(const Blocks&) = delete;

  uint8_t* data(size_t i) const { return payload + i * padded(bytes); }
  // Block i of this set in `slot`, its payload in buffer `buf` (default: its own).
  SsdBlock at(size_t i, int32_t slot, uint8_t* buf = nullptr) const {
    return SsdBlock{slot, keys[i], parents[i], positions[i], tokens.data() + i * tpb, buf ? buf : data(i)};
  }
};

struct Buffer {
  uint8_t* p;
  uint64_t stride;
  Buffer(size_t n, uint64_t bytes) : p(static_cast<uint8_t*>(std::aligned_alloc(kPage, n * padded(bytes)))),
                                     stride(padded(bytes)) {
    std::memset(p, 0xEE, n * stride);
  }
  ~Buffer() { std::free(p); }
  uint8_t* at(size_t i) const { return p + i * stride; }
};

std::shared_ptr<IoEnv> env_of(int kind) {
  if (kind == 0) return flexkv::make_uring_env(64);
  return flexkv::make_thread_env(3);
}

SsdStoreOptions options(std::vector<std::string> dirs, int64_t num_blocks, uint64_t block_bytes, uint32_t tpb,
                        std::string fp = "model-A", uint64_t max_file_bytes = 0) {
  SsdStoreOptions o;
  o.dirs = std::move(dirs);
  o.num_blocks = num_blocks;
  o.block_bytes = block_bytes;
  o.tokens_per_block = tpb;
  o.fingerprint = std::move(fp);
  o.max_file_bytes = max_file_bytes;
  return o;
}

std::vector<SsdStatus> write_blocks(SsdStore& s, const std::vector<SsdBlock>& b) {
  std::vector<SsdStatus> st(b.size(), SsdStatus::kMismatch);
  s.write(b.data(), b.size(), st.data());
  return st;
}
std::vector<SsdStatus> read_blocks(SsdStore& s, const std::vector<SsdBlock>& b) {
  std::vector<SsdStatus> st(b.size(), SsdStatus::kOk);
  s.read(b.data(), b.size(), st.data());
  return st;
}
bool all(const std::vector<SsdStatus>& st, SsdStatus want) {
  return std::all_of(st.begin(), st.end(), [&](SsdStatus s) { return s == want; });
}

// The file and offset of a slot (the layout ssd_store.h describes).
std::string subdir_of(const std::string& dir) {
  std::string found;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, "flexkv-", 7) == 0) found = dir + "/" + e->d_name;
    }
    ::closedir(d);
  }
  return found;
}

size_t count_files(const std::string& dir) {
  size_t n = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

// Flips one byte of a file with plain (buffered) I/O; O_DIRECT readers see it after the page cache is
// written back, which fsync + POSIX_FADV_DONTNEED forces.
void flip_byte(const std::string& path, uint64_t offset) {
  int fd = ::open(path.c_str(), O_RDWR);
  CHECK(fd >= 0);
  uint8_t b = 0;
  CHECK_EQ(::pread(fd, &b, 1, static_cast<off_t>(offset)), 1);
  b ^= 0x5A;
  CHECK_EQ(::pwrite(fd, &b, 1, static_cast<off_t>(offset)), 1);
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

void copy_bytes(const std::string& path, uint64_t from, uint64_t to, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDWR);
  std::vector<uint8_t> buf(len);
  CHECK_EQ(::pread(fd, buf.data(), len, static_cast<off_t>(from)), static_cast<ssize_t>(len));
  CHECK_EQ(::pwrite(fd, buf.data(), len, static_cast<off_t>(to)), static_cast<ssize_t>(len));
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

std::vector<uint8_t> file_bytes(const std::string& path, uint64_t offset, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDONLY);
  std::vector<uint8_t> buf(len);
  CHECK_EQ(::pread(fd, buf.data(), len, static_cast<off_t>(offset)), static_cast<ssize_t>(len));
  ::close(fd);
  return buf;
}

void put_bytes(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  int fd = ::open(path.c_str(), O_RDWR);
  CHECK_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)), static_cast<ssize_t>(bytes.size()));
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Counts the requests and iovecs that reach the env (and shows that a plain IoEnv, with only run(), works).
class CountingEnv : public IoEnv {
 public:
  explicit CountingEnv(std::unique_ptr<IoEnv> base) : base_(std::move(base)) {}
  std::string name() const override { return "counting"; }
  void run(const flexkv::IoRequest* reqs, size_t n, int64_t* results) override {
    requests += n;
    for (size_t i = 0; i < n; ++i) iovecs += static_cast<size_t>(reqs[i].iovcnt);
    base_->run(reqs, n, results);
  }
  int open_file(const std::string& path, uint64_t size) override { return base_->open_file(path, size); }
  void close_file(int fd) override { base_->close_file(fd); }
  std::atomic<size_t> requests{0}, iovecs{0};

 private:
  std::unique_ptr<IoEnv> base_;
};

}  // namespace

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

TEST(io_errors_and_torn_writes_through_the_fault_env) {
  for (int kind = 0; kind < 2; ++kind) {
    TempDir dir;
    const uint64_t bytes = 64 << 10;
    auto fault = std::make_shared<flexkv::FaultInjectingEnv>(kind == 0 ? flexkv::make_uring_env(16)
                                                                       : flexkv::make_thread_env(2));
    SsdStore store(options({dir.path}, 32, bytes, 16), fault);
    CHECK_EQ(store.io_env_name(), kind == 0 ? "fault(io_uring)" : "fault(threads)");
    Blocks b(8, bytes, 16, 41);
    Buffer out(8, bytes);
    std::vector<SsdBlock> w, r;
    for (size_t i = 0; i < 8; ++i) {  // scattered: one request per block
      w.push_back(b.at(i, static_cast<int32_t>(3 * i)));
      r.push_back(b.at(i, static_cast<int32_t>(3 * i), out.at(i)));
    }
    fault->fail_writes(EIO, 2, 3);
    std::vector<SsdStatus> st = write_blocks(store, w);
    CHECK(st[0] == SsdStatus::kOk && st[1] == SsdStatus::kOk);
    for (size_t i = 2; i < 5; ++i) CHECK(st[i] == SsdStatus::kIoError);
    CHECK(st[5] == SsdStatus::kOk);
    st = read_blocks(store, r);
    CHECK(st[0] == SsdStatus::kOk && st[2] == SsdStatus::kMismatch && st[7] == SsdStatus::kOk);
    fault->fail_writes(ENOSPC, 0, -1);
    CHECK(all(write_blocks(store, w), SsdStatus::kIoError));
    fault->clear();
    CHECK(all(write_blocks(store, w), SsdStatus::kOk));
    fault->fail_reads(EIO, 0, -1);
    CHECK(all(read_blocks(store, r), SsdStatus::kIoError));
    fault->clear();
    CHECK(all(read_blocks(store, r), SsdStatus::kOk));
    // Torn writes of other blocks over the same slots: reported ok, read back as a mismatch, never kOk.
    Blocks nb(8, bytes, 16, 42);
    std::vector<SsdBlock> w2, r2;
    for (size_t i = 0; i < 8; ++i) {
      w2.push_back(nb.at(i, static_cast<int32_t>(3 * i)));
      r2.push_back(nb.at(i, static_cast<int32_t>(3 * i), out.at(i)));
    }
    fault->tear_writes(4);
    CHECK(all(write_blocks(store, w2), SsdStatus::kOk));
    st = read_blocks(store, r2);
    size_t torn = 0;
    for (SsdStatus s : st) torn += s == SsdStatus::kMismatch;
    CHECK_EQ(torn, 4u);
    for (SsdStatus s : st) CHECK(s != SsdStatus::kIoError);
    // The old blocks are gone from the torn slots as well (payload half new, half old).
    st = read_blocks(store, r);
    for (SsdStatus s : st) CHECK(s == SsdStatus::kMismatch);
    // A torn run of neighbours: the blocks in its first half land, the rest do not.
    std::vector<SsdBlock> run, runr;
    for (size_t i = 0; i < 8; ++i) {
      run.push_back(b.at(i, static_cast<int32_t>(24 + i)));
      runr.push_back(b.at(i, static_cast<int32_t>(24 + i), out.at(i)));
    }
    fault->tear_writes(1);
    CHECK(all(write_blocks(store, run), SsdStatus::kOk));
    st = read_blocks(store, runr);
    for (size_t i = 0; i < 4; ++i) CHECK(st[i] == SsdStatus::kOk);
    for (size_t i = 4; i < 8; ++i) CHECK(st[i] == SsdStatus::kMismatch);
  }
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

TEST(constructor_errors_name_the_directory_and_the_remedy) {
  TempDir dir;
  auto env = env_of(0);
  // Impossible options.
  CHECK_THROWS(SsdStore(options({}, 8, 4096, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 0, 4096, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 0, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 0), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 16, "fp", 4096), env));  // smaller than a slot
  const std::vector<std::string> twice = {dir.path, dir.path + "/"};
  CHECK_THROWS(SsdStore(options(twice, 8, 4096, 16), env));  // the same dir twice
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 16), nullptr));

  // A missing directory whose parent cannot be created: a regular file where a directory should be.
  const std::string file = dir.path + "/a-file";
  ::close(::open(file.c_str(), O_CREAT | O_WRONLY, 0644));
  std::string msg = error_of([&] { SsdStore s(options({file + "/sub/dir"}, 8, 4096, 16), env); });
  CHECK(contains(msg, file + "/sub/dir"));
  CHECK(contains(msg, "does not exist and cannot be created"));
  CHECK(contains(msg, "ssd_cache_dir"));
  msg = error_of([&] { SsdStore s(options({"/proc/flexkv-no-such-dir/x"}, 8, 4096, 16), env); });
  CHECK(contains(msg, "/proc/flexkv-no-such-dir/x"));
  CHECK(contains(msg, "cannot be created"));
  // A path that is a file.
  msg = error_of([&] { SsdStore s(options({file}, 8, 4096, 16), env); });
  CHECK(contains(msg, file));

  // A directory that cannot be written. chmod 0555 does not stop root (the tests run as root here), so
  // make it immutable (chattr +i) instead; where neither works, this one check is skipped.
  const std::string ro = dir.path + "/read-only";
  ::mkdir(ro.c_str(), 0755);
  bool made_ro = false;
  bool immutable = false;
  if (::geteuid() != 0) {
    made_ro = ::chmod(ro.c_str(), 0555) == 0;
  } else {
    int fd = ::open(ro.c_str(), O_RDONLY | O_DIRECTORY);
    int flags = 0;
    if (fd >= 0 && ::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
      flags |= FS_IMMUTABLE_FL;
      immutable = made_ro = ::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
    }
    if (fd >= 0) ::close(fd);
  }
  if (made_ro) {
    msg = error_of([&] { SsdStore s(options({ro}, 8, 4096, 16), env); });
    CHECK(contains(msg, ro));
    CHECK(contains(msg, "not writable"));
    CHECK(contains(msg, "ssd_cache_dir"));
    if (immutable) {
      int fd = ::open(ro.c_str(), O_RDONLY | O_DIRECTORY);
      int flags = 0;
      ::ioctl(fd, FS_IOC_GETFLAGS, &flags);
      flags &= ~FS_IMMUTABLE_FL;
      ::ioctl(fd, FS_IOC_SETFLAGS, &flags);
      ::close(fd);
    }
  } else {
    std::printf("  note: cannot make a read-only directory here; the not-writable check is skipped\n");
  }

  // Not enough space: refused before anything is allocated.
  msg = error_of([&] { SsdStore s(options({dir.path + "/big"}, 1 << 20, uint64_t{1} << 30, 16), env); });
  CHECK(contains(msg, dir.path + "/big"));
  CHECK(contains(msg, "not enough free space"));
  CHECK(contains(msg, "num_ssd_blocks"));

  // No O_DIRECT: tmpfs before Linux 6.6 (here through the fault env's fail_open, which throws what the
  // base env throws for EINVAL from open(O_DIRECT)).
  auto fault = std::make_shared<flexkv::FaultInjectingEnv>(flexkv::make_uring_env(4));
  fault->fail_open(EINVAL);
  msg = error_of([&] { SsdStore s(options({dir.path + "/nod"}, 8, 4096, 16), fault); });
  CHECK(contains(msg, dir.path + "/nod"));
  CHECK(contains(msg, "does not support O_DIRECT"));
  CHECK(contains(msg, "put ssd_cache_dir on a disk"));
  // And on a real tmpfs: an error that names O_DIRECT where tmpfs lacks it, a working store where it has it.
  struct statfs sfs;
  if (::statfs("/dev/shm", &sfs) == 0 && sfs.f_type == 0x01021994) {
    const std::string shm = "/dev/shm/flexkv-test-ssd-" + std::to_string(::getpid());
    msg = error_of([&] {
      SsdStore s(options({shm}, 4, 4096, 16), env);
      Blocks b(1, 4096, 16, 1);
      CHECK(all(write_blocks(s, {b.at(0, 0)}), SsdStatus::kOk));
    });
    if (!msg.empty()) {
      CHECK(contains(msg, "O_DIRECT"));
      CHECK(contains(msg, shm));
    } else {
      std::printf("  note: /dev/shm (tmpfs) supports O_DIRECT on this kernel (Linux >= 6.6)\n");
    }
    ::nftw(shm.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
}

TEST_MAIN()
