// Shared by the SsdStore tests (test_ssd_store_*.cc; transfer/ssd_store.h): temporary directories,
// random blocks and aligned buffers, store options, read / write wrappers, byte-level file edits,
// and an IoEnv that counts the requests that reach it. Each test binary includes it once.
#pragma once

#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
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
#include <string>
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

inline uint64_t padded(uint64_t b) { return (b + kPage - 1) / kPage * kPage; }

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

inline std::shared_ptr<IoEnv> env_of(int kind) {
  if (kind == 0) return flexkv::make_uring_env(64);
  return flexkv::make_thread_env(3);
}

inline SsdStoreOptions options(std::vector<std::string> dirs, int64_t num_blocks, uint64_t block_bytes,
                               uint32_t tpb, std::string fp = "model-A", uint64_t max_file_bytes = 0) {
  SsdStoreOptions o;
  o.dirs = std::move(dirs);
  o.num_blocks = num_blocks;
  o.block_bytes = block_bytes;
  o.tokens_per_block = tpb;
  o.fingerprint = std::move(fp);
  o.max_file_bytes = max_file_bytes;
  return o;
}

inline std::vector<SsdStatus> write_blocks(SsdStore& s, const std::vector<SsdBlock>& b) {
  std::vector<SsdStatus> st(b.size(), SsdStatus::kMismatch);
  s.write(b.data(), b.size(), st.data());
  return st;
}
inline std::vector<SsdStatus> read_blocks(SsdStore& s, const std::vector<SsdBlock>& b) {
  std::vector<SsdStatus> st(b.size(), SsdStatus::kOk);
  s.read(b.data(), b.size(), st.data());
  return st;
}
inline bool all(const std::vector<SsdStatus>& st, SsdStatus want) {
  return std::all_of(st.begin(), st.end(), [&](SsdStatus s) { return s == want; });
}

// The file and offset of a slot (the layout ssd_store.h describes).
inline std::string subdir_of(const std::string& dir) {
  std::string found;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      if (std::strncmp(e->d_name, "flexkv-", 7) == 0) found = dir + "/" + e->d_name;
    }
    ::closedir(d);
  }
  return found;
}

inline size_t count_files(const std::string& dir) {
  size_t n = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

// Flips one byte of a file with plain (buffered) I/O; O_DIRECT readers see it after the page cache is
// written back, which fsync + POSIX_FADV_DONTNEED forces.
inline void flip_byte(const std::string& path, uint64_t offset) {
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

inline void copy_bytes(const std::string& path, uint64_t from, uint64_t to, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDWR);
  std::vector<uint8_t> buf(len);
  CHECK_EQ(::pread(fd, buf.data(), len, static_cast<off_t>(from)), static_cast<ssize_t>(len));
  CHECK_EQ(::pwrite(fd, buf.data(), len, static_cast<off_t>(to)), static_cast<ssize_t>(len));
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

inline std::vector<uint8_t> file_bytes(const std::string& path, uint64_t offset, uint64_t len) {
  int fd = ::open(path.c_str(), O_RDONLY);
  std::vector<uint8_t> buf(len);
  CHECK_EQ(::pread(fd, buf.data(), len, static_cast<off_t>(offset)), static_cast<ssize_t>(len));
  ::close(fd);
  return buf;
}

inline void put_bytes(const std::string& path, uint64_t offset, const std::vector<uint8_t>& bytes) {
  int fd = ::open(path.c_str(), O_RDWR);
  CHECK_EQ(::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset)), static_cast<ssize_t>(bytes.size()));
  ::fsync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

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
