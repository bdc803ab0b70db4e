#include "transfer/ssd_store.h"

#include <dirent.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "ssd_block_header.h"

namespace flexkv {
namespace {

using ssd::kAlign;
using ssd::round_up;

constexpr size_t kMaxRunBlocks = IOV_MAX / 2;    // two iovecs (header, payload) per block
// A run longer than this (but always at least one block) is split into several requests: that keeps many
// requests in flight and lets the checksums of one overlap the I/O of the others (measured best at 1-2 MiB).
constexpr uint64_t kMaxRunBytes = 2ull << 20;
constexpr uint64_t kScanBatchBytes = 32ull << 20;  // header bytes read per scan batch, at most
constexpr uint64_t kScanMinBatch = 256;              // slots per scan batch, at least (when there are as many)
constexpr uint64_t kScanProgressSteps = 16;          // a long scan reports at least this many times

// Aligned buffers for headers, reused across calls (big allocations are mmap'ed fresh otherwise, and every
// page then faults on first touch).
class AlignedPool {
 public:
  class Buffer {
   public:
    Buffer(AlignedPool* pool, uint8_t* data, size_t size) : pool_(pool), data_(data), size_(size) {}
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() {
      if (data_) pool_->put(data_, size_);
    }
    uint8_t* data() const { return data_; }

   private:
    AlignedPool* pool_;
    uint8_t* data_;
    size_t size_;
  };

  ~AlignedPool() {
    for (auto& f : free_) std::free(f.second);
  }

  Buffer get(size_t bytes) {
    bytes = round_up(bytes == 0 ? 1 : bytes, 64 * 1024);
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].first >= bytes && (best == free_.size() || free_[i].first < free_[best].first)) best = i;
      }
      if (best != free_.size()) {
        auto f = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        free_bytes_ -= f.first;
        return Buffer(this, f.second, f.first);
      }
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return Buffer(this, static_cast<uint8_t*>(p), bytes);
  }

 private:
  static constexpr size_t kKeepBuffers = 8;
  static constexpr size_t kKeepBytes = 1ull << 30;

  void put(uint8_t* data, size_t size) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.emplace_back(size, data);
    free_bytes_ += size;
    // Keep a few buffers and a bounded number of bytes: drop the smallest when there are too many buffers,
    // the largest when they hold too much.
    while (!free_.empty() && (free_.size() > kKeepBuffers || free_bytes_ > kKeepBytes)) {
      auto victim = free_bytes_ > kKeepBytes ? std::max_element(free_.begin(), free_.end())
                                             : std::min_element(free_.begin(), free_.end());
      free_bytes_ -= victim->first;
      std::free(victim->second);
      free_.erase(victim);
    }
  }

  std::mutex mu_;
  std::vector<std::pair<size_t, uint8_t*>> free_;
  size_t free_bytes_ = 0;
};

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string join(const std::string& dir, const std::string& name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  return buf;
}

// mkdir -p; the directories it creates are owner-only (0700: the slots hold users' token ids), those that
// exist are left as they are. Returns 0 or the errno that stopped it.
int make_dirs(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
  size_t pos = 0;
  for (;;) {
    pos = path.find('/', pos + 1);
    const std::string prefix = path.substr(0, pos);
    if (!prefix.empty() && ::mkdir(prefix.c_str(), 0700) != 0 && errno != EEXIST) return errno;
    if (pos == std::string::npos) break;
  }
  if (::stat(path.c_str(), &st) != 0) return errno;
  return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
}

std::runtime_error dir_error(const std::string& dir, const std::string& what, int err, const std::string& remedy) {
  return std::runtime_error("SSD cache directory " + dir + " " + what + " (" + std::strerror(err) + "); " + remedy);
}

const char* kNotWritable = "make it writable for this user or choose another ssd_cache_dir";

}  // namespace

struct SsdStore::Impl {
  SsdStoreOptions opt;
  std::shared_ptr<IoEnv> env;
  uint64_t fp_hash = 0;
  uint64_t header_bytes = 0;
  uint64_t payload_bytes = 0;  // block_bytes rounded up to 4096
  uint64_t slot_bytes = 0;
  uint64_t slots_per_file = 0;
  std::vector<std::vector<int>> fds;  // [dir][file]
  std::vector<std::string> foreign;
  AlignedPool pool;
  uint8_t* zero_page = nullptr;  // kAlign zero bytes: what invalidate() writes over a header

  ~Impl() {
    for (auto& files : fds)
      for (int fd : files) env->close_file(fd);
    std::free(zero_page);
  }

  struct Location {
    uint32_t dir;
    uint64_t local;  // the slot's index among its directory's slots
    int fd;
    uint64_t offset;
  };
  Location locate(int32_t slot) const {
    const uint64_t d = static_cast<uint64_t>(slot) % opt.dirs.size();
    const uint64_t local = static_cast<uint64_t>(slot) / opt.dirs.size();
    const uint64_t file = local / slots_per_file;
    return Location{static_cast<uint32_t>(d), local, fds[d][file], (local % slots_per_file) * slot_bytes};
  }

  void check_slot(int32_t slot, size_t i) const {
    if (slot < 0 || slot >= opt.num_blocks) {
      throw std::out_of_range("SSD slot " + std::to_string(slot) + " (block " + std::to_string(i) +
                              ") is outside 0.." + std::to_string(opt.num_blocks - 1));
    }
  }

  void validate(const SsdBlock* blocks, size_t n) const {
    for (size_t i = 0; i < n; ++i) {
      check_slot(blocks[i].slot, i);
      if (blocks[i].payload == nullptr || reinterpret_cast<uintptr_t>(blocks[i].payload) % kAlign != 0) {
        throw std::invalid_argument("payload buffer of block " + std::to_string(i) +
                                    " is null or not 4096-byte aligned (O_DIRECT needs aligned host blocks)");
      }
      if (blocks[i].tokens == nullptr) throw std::invalid_argument("block " + std::to_string(i) + " has no token ids");
    }
  }

  // The I/O of one batch: blocks sorted by place on disk, neighbours in one file grouped into runs, one
  // request per run. Block order[p]'s header is at headers + p * header_bytes.
  struct Plan {
    std::vector<uint32_t> order;
    std::vector<size_t> run_start;  // per run: its first position in order; plus n at the end
    std::vector<struct iovec> iov;
    std::vector<IoRequest> reqs;
  };

  Plan plan(const SsdBlock* blocks, size_t n, uint8_t* headers, bool write) const {
    Plan p;
    p.order.resize(n);
    for (size_t i = 0; i < n; ++i) p.order[i] = static_cast<uint32_t>(i);
    const uint64_t ndirs = opt.dirs.size();
    auto place = [&](uint32_t i) {
      const uint64_t s = static_cast<uint64_t>(blocks[i].slot);
      return std::make_pair(s % ndirs, s / ndirs);
    };
    std::sort(p.order.begin(), p.order.end(), [&](uint32_t a, uint32_t b) { return place(a) < place(b); });
    p.iov.resize(2 * n);
    uint64_t prev_dir = 0, prev_local = 0, run_bytes = 0;
    size_t run_len = 0;
    for (size_t k = 0; k < n; ++k) {
      const SsdBlock& b = blocks[p.order[k]];
      const Location loc = locate(b.slot);
      const bool extends = run_len > 0 && loc.dir == prev_dir && loc.local == prev_local + 1 &&
                           loc.local / slots_per_file == prev_local / slots_per_file && run_len < kMaxRunBlocks &&
                           run_bytes + slot_bytes <= kMaxRunBytes;
      if (run_len > 0 && write && loc.dir == prev_dir && loc.local == prev_local) {
        throw std::invalid_argument("SSD slot " + std::to_string(b.slot) + " appears twice in one write");
      }
      p.iov[2 * k] = {headers + k * header_bytes, static_cast<size_t>(header_bytes)};
      p.iov[2 * k + 1] = {b.payload, static_cast<size_t>(payload_bytes)};
      if (extends) {
        p.reqs.back().iovcnt += 2;
        ++run_len;
        run_bytes += slot_bytes;
      } else {
        p.run_start.push_back(k);
        p.reqs.push_back(IoRequest{loc.fd, loc.offset, &p.iov[2 * k], 2, write});
        run_len = 1;
        run_bytes = slot_bytes;
      }
      prev_dir = loc.dir;
      prev_local = loc.local;
    }
    p.run_start.push_back(n);
    return p;
  }

  bool verify(const SsdBlock& b, const uint8_t* header) const {
    ssd::HeaderFields f;
    const int64_t* tokens = nullptr;
    if (!ssd::decode_header(header, opt.tokens_per_block, &f, &tokens)) return false;
    if (f.fingerprint_hash != fp_hash || f.block_bytes != opt.block_bytes) return false;
    if (f.key != b.key || f.parent != b.parent || f.position != b.position) return false;
    if (std::memcmp(tokens, b.tokens, 8 * static_cast<size_t>(opt.tokens_per_block)) != 0) return false;
    return ssd::hash64(b.payload, opt.block_bytes) == f.payload_checksum;
  }
};

SsdStore::SsdStore(SsdStoreOptions options, std::shared_ptr<IoEnv> env) : impl_(new Impl) {
  Impl& s = *impl_;
  s.opt = std::move(options);
  s.env = std::move(env);
  const SsdStoreOptions& o = s.opt;
  if (!s.env) throw std::invalid_argument("SsdStore needs an IoEnv");
  if (o.dirs.empty()) throw std::invalid_argument("SsdStore needs at least one directory (ssd_cache_dir)");
  if (o.num_blocks < 1 || o.num_blocks > INT32_MAX) {
    throw std::invalid_argument("num_ssd_blocks = " + std::to_string(o.num_blocks) + " is out of range: expected 1.." +
                                std::to_string(INT32_MAX));
  }
  if (o.block_bytes == 0) throw std::invalid_argument("SSD block_bytes must be positive");
  if (o.tokens_per_block == 0 || o.tokens_per_block > (1u << 20)) {
    throw std::invalid_argument("tokens_per_block = " + std::to_string(o.tokens_per_block) +
                                " is out of range for the SSD tier: expected 1..1048576");
  }
  s.fp_hash = ssd::hash64(o.fingerprint.data(), o.fingerprint.size());
  s.header_bytes = ssd::header_bytes(o.tokens_per_block);
  s.payload_bytes = round_up(o.block_bytes, kAlign);
  s.slot_bytes = s.header_bytes + s.payload_bytes;
  if (o.max_file_bytes == 0) {
    s.slots_per_file = UINT64_MAX;
  } else {
    s.slots_per_file = o.max_file_bytes / s.slot_bytes;
    if (s.slots_per_file == 0) {
      throw std::invalid_argument("max_file_bytes = " + std::to_string(o.max_file_bytes) +
                                  " is smaller than one SSD slot (" + std::to_string(s.slot_bytes) +
                                  " bytes); use 0 (one file per directory) or at least " +
                                  std::to_string(s.slot_bytes));
    }
  }
  void* z = std::aligned_alloc(kAlign, kAlign);
  if (z == nullptr) throw std::bad_alloc();
  std::memset(z, 0, kAlign);
  s.zero_page = static_cast<uint8_t*>(z);

  const std::string subname = "flexkv-" + hex16(s.fp_hash);
  const uint64_t ndirs = o.dirs.size();
  std::vector<std::string> real_dirs;
  s.fds.resize(ndirs);
  for (uint64_t d = 0; d < ndirs; ++d) {
    const std::string& dir = o.dirs[d];
    if (dir.empty()) throw std::invalid_argument("ssd_cache_dir entry " + std::to_string(d) + " is empty");
    if (int err = make_dirs(dir)) {
      if (err == EACCES || err == EPERM || err == EROFS) {
        throw dir_error(dir, "does not exist and cannot be created", err,
                        "create it, make its parent writable for this user or choose another ssd_cache_dir");
      }
      throw dir_error(dir, "does not exist and cannot be created", err,
                      "create it or set ssd_cache_dir to a directory on a local disk");
    }
    char* rp = ::realpath(dir.c_str(), nullptr);
    const std::string real = rp ? rp : dir;
    std::free(rp);
    if (std::find(real_dirs.begin(), real_dirs.end(), real) != real_dirs.end()) {
      throw std::invalid_argument("SSD cache directory " + dir + " is listed twice in ssd_cache_dir (as " + real +
                                  "); list each directory once");
    }
    real_dirs.push_back(real);

    // Other fingerprints' subdirectories: reported, never touched.
    if (DIR* dp = ::opendir(dir.c_str())) {
      while (struct dirent* e = ::readdir(dp)) {
        const std::string name = e->d_name;
        if (name.compare(0, 7, "flexkv-") != 0 || name == subname) continue;
        struct stat st;
        const std::string path = join(dir, name);
        if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) s.foreign.push_back(path);
      }
      ::closedir(dp);
    }

    const std::string sub = join(dir, subname);
    if (::mkdir(sub.c_str(), 0700) != 0 && errno != EEXIST) {  // owner-only, as the files in it
      const int err = errno;
      if (err == EACCES || err == EPERM || err == EROFS) throw dir_error(dir, "is not writable", err, kNotWritable);
      throw dir_error(dir, "cannot hold the SSD cache: creating " + sub + " failed", err,
                      "check the directory or choose another ssd_cache_dir");
    }
    struct stat st;
    if (::stat(sub.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
      throw dir_error(dir, "cannot hold the SSD cache: " + sub + " is not a directory", ENOTDIR,
                      "remove it or choose another ssd_cache_dir");
    }
    if (::access(sub.c_str(), W_OK | X_OK) != 0) throw dir_error(dir, "is not writable", errno, kNotWritable);

    // This directory's files and their sizes.
    const uint64_t local_slots = (static_cast<uint64_t>(o.num_blocks) - d + ndirs - 1) / ndirs;
    std::vector<std::pair<std::string, uint64_t>> files;
    for (uint64_t first = 0; first < local_slots;) {
      const uint64_t count = std::min(local_slots - first, s.slots_per_file);
      char name[32];
      std::snprintf(name, sizeof(name), "blocks-%06llu.dat", static_cast<unsigned long long>(files.size()));
      files.emplace_back(join(sub, name), count * s.slot_bytes);
      first += count;
    }
    // Check the space first: fallocate on a too-small disk would fill it before failing.
    uint64_t missing = 0;
    for (auto& [path, size] : files) {
      struct stat fst;
      uint64_t have = 0;
      if (::stat(path.c_str(), &fst) == 0) have = std::min<uint64_t>(static_cast<uint64_t>(fst.st_blocks) * 512, size);
      missing += size - have;
    }
    struct statvfs vfs;
    if (::statvfs(sub.c_str(), &vfs) == 0) {
      const uint64_t avail = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
      if (missing > avail) {
        throw dir_error(dir, "has not enough free space: the SSD tier needs " + gib(missing) + " more there, " +
                                 gib(avail) + " are free",
                        ENOSPC, "free space, lower num_ssd_blocks (ssd_cache_gb) or add directories to ssd_cache_dir");
      }
    }
    for (auto& [path, size] : files) s.fds[d].push_back(s.env->open_file(path, size));
  }
  std::sort(s.foreign.begin(), s.foreign.end());
}

SsdStore::~SsdStore() = default;

uint64_t SsdStore::slot_bytes() const { return impl_->slot_bytes; }
std::string SsdStore::io_env_name() const { return impl_->env->name(); }
std::vector<std::string> SsdStore::foreign_subdirs() const { return impl_->foreign; }

void SsdStore::write(const SsdBlock* blocks, size_t n, SsdStatus* status) {
  if (n == 0) return;
  const Impl& s = *impl_;
  s.validate(blocks, n);
  AlignedPool::Buffer headers = impl_->pool.get(n * s.header_bytes);
  Impl::Plan p = s.plan(blocks, n, headers.data(), true);
  std::vector<int64_t> results(p.reqs.size());
  IoHooks hooks;
  hooks.prepare = [&](size_t r) {
    for (size_t k = p.run_start[r]; k < p.run_start[r + 1]; ++k) {
      const SsdBlock& b = blocks[p.order[k]];
      ssd::HeaderFields f;
      f.fingerprint_hash = s.fp_hash;
      f.key = b.key;
      f.parent = b.parent;
      f.position = b.position;
      f.tokens_per_block = s.opt.tokens_per_block;
      f.block_bytes = s.opt.block_bytes;
      f.payload_checksum = ssd::hash64(b.payload, s.opt.block_bytes);
      ssd::encode_header(headers.data() + k * s.header_bytes, f, b.tokens);
    }
  };
  hooks.complete = [&](size_t r, int64_t res) {
    const uint64_t want = (p.run_start[r + 1] - p.run_start[r]) * s.slot_bytes;
    const SsdStatus st = res == static_cast<int64_t>(want) ? SsdStatus::kOk : SsdStatus::kIoError;
    for (size_t k = p.run_start[r]; k < p.run_start[r + 1]; ++k) status[p.order[k]] = st;
  };
  s.env->run_with_hooks(p.reqs.data(), p.reqs.size(), results.data(), hooks);
}

void SsdStore::read(const SsdBlock* blocks, size_t n, SsdStatus* status) {
  if (n == 0) return;
  const Impl& s = *impl_;
  s.validate(blocks, n);
  AlignedPool::Buffer headers = impl_->pool.get(n * s.header_bytes);
  Impl::Plan p = s.plan(blocks, n, headers.data(), false);
  std::vector<int64_t> results(p.reqs.size());
  IoHooks hooks;
  hooks.complete = [&](size_t r, int64_t res) {
    for (size_t k = p.run_start[r]; k < p.run_start[r + 1]; ++k) {
      const uint32_t i = p.order[k];
      if (res < 0) {
        status[i] = SsdStatus::kIoError;
      } else if (static_cast<uint64_t>(res) < (k - p.run_start[r] + 1) * s.slot_bytes) {
        status[i] = SsdStatus::kMismatch;  // past the end of a truncated file: not stored
      } else {
        status[i] = s.verify(blocks[i], headers.data() + k * s.header_bytes) ? SsdStatus::kOk : SsdStatus::kMismatch;
      }
    }
  };
  s.env->run_with_hooks(p.reqs.data(), p.reqs.size(), results.data(), hooks);
}

std::vector<SsdEntry> SsdStore::scan(int64_t limit, const ScanProgress& progress) {
  const Impl& s = *impl_;
  const uint64_t total = static_cast<uint64_t>(limit < 0 ? s.opt.num_blocks : std::min(limit, s.opt.num_blocks));
  if (total == 0) return {};
  const uint64_t by_bytes = std::max<uint64_t>(1, kScanBatchBytes / s.header_bytes);
  const uint64_t by_steps = std::max<uint64_t>(kScanMinBatch, (total + kScanProgressSteps - 1) / kScanProgressSteps);
  const uint64_t batch = std::min<uint64_t>(total, std::min(by_bytes, by_steps));
  AlignedPool::Buffer buf = impl_->pool.get(batch * s.header_bytes);
  std::vector<struct iovec> iov(batch);
  std::vector<IoRequest> reqs(batch);
  std::vector<int64_t> results(batch);
  std::vector<SsdEntry> found(batch);
  std::vector<uint8_t> valid(batch);
  std::vector<SsdEntry> out;
  for (uint64_t first = 0; first < total; first += batch) {
    const size_t m = static_cast<size_t>(std::min(batch, total - first));
    for (size_t j = 0; j < m; ++j) {
      const Impl::Location loc = s.locate(static_cast<int32_t>(first + j));
      iov[j] = {buf.data() + j * s.header_bytes, static_cast<size_t>(s.header_bytes)};
      reqs[j] = IoRequest{loc.fd, loc.offset, &iov[j], 1, false};
      valid[j] = 0;
    }
    IoHooks hooks;
    hooks.complete = [&](size_t j, int64_t res) {
      if (res != static_cast<int64_t>(s.header_bytes)) return;  // unreadable or past the end: not stored
      ssd::HeaderFields f;
      const int64_t* tokens = nullptr;
      if (!ssd::decode_header(buf.data() + j * s.header_bytes, s.opt.tokens_per_block, &f, &tokens)) return;
      if (f.fingerprint_hash != s.fp_hash || f.block_bytes != s.opt.block_bytes || f.position < 0) return;
      found[j] = SsdEntry{static_cast<int32_t>(first + j), f.key, f.parent, f.position};
      valid[j] = 1;
    };
    s.env->run_with_hooks(reqs.data(), m, results.data(), hooks);
    for (size_t j = 0; j < m; ++j)
      if (valid[j]) out.push_back(found[j]);
    if (progress) progress(first + m, total, out.size());
  }
  return out;
}

void SsdStore::invalidate(const int32_t* slots, size_t n) {
  if (n == 0) return;
  const Impl& s = *impl_;
  for (size_t i = 0; i < n; ++i) s.check_slot(slots[i], i);
  const struct iovec zero{s.zero_page, static_cast<size_t>(kAlign)};  // the magic lies in the first 4096 bytes
  std::vector<IoRequest> reqs(n);
  for (size_t i = 0; i < n; ++i) {
    const Impl::Location loc = s.locate(slots[i]);
    reqs[i] = IoRequest{loc.fd, loc.offset, &zero, 1, true};
  }
  std::vector<int64_t> results(n);
  s.env->run(reqs.data(), n, results.data());
  size_t failed = 0;
  std::string first;
  for (size_t i = 0; i < n; ++i) {
    if (results[i] == static_cast<int64_t>(kAlign)) continue;
    if (failed++ == 0) {
      first = "slot " + std::to_string(slots[i]) + ": " +
              (results[i] < 0 ? std::strerror(static_cast<int>(-results[i])) : "short write");
    }
  }
  if (failed > 0) {
    throw std::runtime_error("could not invalidate " + std::to_string(failed) + " of " + std::to_string(n) +
                             " SSD slots (first: " + first + "); the disk may be failing");
  }
}

}  // namespace flexkv
