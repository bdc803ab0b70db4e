#include "control/ssd_tier.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <stdexcept>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "control/log.h"
#include "flexkv/errors.h"

namespace flexkv {
namespace {

constexpr const char* kDirKey = "cache_config.ssd_cache_dir";
constexpr int64_t kWatermarkStep = 4096;  // slots between two updates of the written-slot mark

std::string tag_of(const std::string& fingerprint) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx",
                static_cast<unsigned long long>(XXH3_64bits(fingerprint.data(), fingerprint.size())));
  return buf;
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

bool exists(const std::string& p, bool* is_dir) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return false;
  *is_dir = S_ISDIR(st.st_mode);
  return true;
}

// A clear error for a directory that cannot hold the tier, before anything is written.
void check_dir(const std::string& dir) {
  std::string probe = dir;
  bool is_dir = false;
  while (!exists(probe, &is_dir)) {
    const std::string up = parent_dir(probe);
    if (up == probe) break;
    probe = up;
  }
  if (!is_dir) {
    throw ConfigError(std::string(kDirKey) + ": " + probe + " is not a directory; point ssd_cache_dir at a "
                      "directory on a local disk", kDirKey);
  }
  if (::access(probe.c_str(), W_OK | X_OK) != 0) {
    const std::string what = probe == dir ? "exists but is read-only" : "does not exist and " + probe + " is read-only";
    throw ConfigError(std::string(kDirKey) + ": " + dir + " " + what + "; make it writable for this user or choose "
                      "another directory", kDirKey);
  }
}

void make_dirs(const std::string& dir) {
  if (dir.empty()) return;
  bool is_dir = false;
  if (exists(dir, &is_dir)) return;
  make_dirs(parent_dir(dir));
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    throw ConfigError(std::string(kDirKey) + ": cannot use " + dir + ": " + std::strerror(errno) +
                      "; make it a writable directory on a local disk", kDirKey);
  }
}

}  // namespace

size_t SsdBatchResult::ok() const {
  size_t n = 0;
  for (SsdStatus s : status) n += s == SsdStatus::kOk ? 1 : 0;
  return n;
}
size_t SsdBatchResult::io_errors() const {
  size_t n = 0;
  for (SsdStatus s : status) n += s == SsdStatus::kIoError ? 1 : 0;
  return n;
}
size_t SsdBatchResult::mismatches() const {
  size_t n = 0;
  for (SsdStatus s : status) n += s == SsdStatus::kMismatch ? 1 : 0;
  return n;
}

SsdTier::SsdTier(const SsdTierOptions& options)
    : options_(options), index_(static_cast<int32_t>(options.num_blocks), options.evict_ratio) {
  index_.set_relocation(false);  // headers record each block's place: blocks never move
  if (options_.dirs.empty()) {
    throw ConfigError(std::string(kDirKey) + ": enable_ssd needs at least one directory (several are separated by "
                      "';')", kDirKey);
  }
  for (const auto& d : options_.dirs) check_dir(d);
  const std::string tag = tag_of(options_.fingerprint);
  try {
    for (const auto& d : options_.dirs) {
      make_dirs(d);
      const std::string path = d + "/.flexkv-" + tag + ".lock";
      const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) {
        throw ConfigError(std::string(kDirKey) + ": cannot use " + d + ": " + std::strerror(errno) +
                          "; make it a writable directory on a local disk", kDirKey);
      }
      lock_fds_.push_back(fd);
      if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
        throw ConfigError(std::string(kDirKey) + ": " + d + " is in use by another FlexKV cache of the same model "
                          "(another process, or another cache in this one); give each instance its own ssd_cache_dir, "
                          "or share one cache between them", kDirKey);
      }
    }
    watermark_path_ = options_.dirs.front() + "/.flexkv-" + tag + ".watermark";
    std::shared_ptr<IoEnv> env = options_.env;
    std::string fallback;
    if (!env) {
      const unsigned depth = options_.queue_depth;
      if (options_.io_engine == "io_uring") {
        try {
          env = make_uring_env(depth);
        } catch (const std::exception& e) {
          throw ConfigError(std::string("ssd_io_engine='io_uring': ") + e.what() + "; use 'auto' to fall back to "
                            "threads", "ssd_io_engine");
        }
      } else if (options_.io_engine == "threads") {
        env = make_thread_env(4);
      } else if (options_.io_engine == "auto") {
        env = make_default_env(depth, 4, &fallback);
      } else {
        throw ConfigError("ssd_io_engine must be 'auto', 'io_uring' or 'threads', got '" + options_.io_engine + "'",
                          "ssd_io_engine");
      }
    }
    SsdStoreOptions so;
    so.dirs = options_.dirs;
    so.num_blocks = options_.num_blocks;
    so.block_bytes = options_.block_bytes;
    so.tokens_per_block = static_cast<uint32_t>(options_.tokens_per_block);
    so.fingerprint = options_.fingerprint;
    try {
      store_ = std::make_unique<SsdStore>(so, env);
    } catch (const ConfigError&) {
      throw;
    } catch (const std::exception& e) {
      throw ConfigError(std::string(kDirKey) + ": " + e.what(), kDirKey);
    }
    if (!fallback.empty()) {
      log_line(LogLevel::kWarning, "SSD tier: io_uring unavailable (" + fallback + "); using the thread-pool fallback");
    }
    for (const auto& foreign : store_->foreign_subdirs()) {
      log_line(LogLevel::kWarning, "SSD tier: ignoring " + foreign +
                                       ": written for another model or KV layout; it is never reused");
    }
    zero_tokens_.assign(static_cast<size_t>(options_.tokens_per_block), 0);
    restored_ = restore();
  } catch (...) {
    for (int fd : lock_fds_) ::close(fd);
    lock_fds_.clear();
    throw;
  }
  std::string dirs;
  for (const auto& d : options_.dirs) dirs += (dirs.empty() ? "" : ", ") + d;
  char size[64];
  std::snprintf(size, sizeof size, "%.2f MiB", static_cast<double>(store_->slot_bytes()) / (1 << 20));
  char took[96];
  std::snprintf(took, sizeof took, " (%lld slots scanned in %.2f s)", static_cast<long long>(scanned_),
                restore_seconds_);
  log_line(LogLevel::kInfo, "SSD tier: " + std::to_string(options_.num_blocks) + " slots of " + size + " over [" +
                                dirs + "] (" + store_->io_env_name() + "), " + std::to_string(restored_) +
                                " blocks restored" + took);
}

SsdTier::~SsdTier() { close(); }

void SsdTier::close() {
  store_.reset();
  for (int fd : lock_fds_) ::close(fd);
  lock_fds_.clear();
}

int64_t SsdTier::restore() {
  int64_t limit = -1;
  {
    std::ifstream in(watermark_path_);
    int64_t v = 0;
    if (in >> v && v >= 0) limit = v;
  }
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point last = start;
  const double every = options_.progress_interval_s;
  const auto progress = [&](uint64_t scanned, uint64_t total, uint64_t found) {
    scanned_ = static_cast<int64_t>(scanned);
    const Clock::time_point now = Clock::now();
    if (scanned >= total || std::chrono::duration<double>(now - last).count() < every) return;
    last = now;
    const double elapsed = std::chrono::duration<double>(now - start).count();
    const double rate = elapsed > 0 ? static_cast<double>(scanned) / elapsed : 0.0;
    char line[256];
    std::snprintf(line, sizeof line,
                  "SSD tier: restoring the index from block headers: %llu/%llu slots scanned (%.0f%%), %llu "
                  "blocks found, %.0f slots/s, ETA %.1f s",
                  static_cast<unsigned long long>(scanned), static_cast<unsigned long long>(total),
                  100.0 * static_cast<double>(scanned) / static_cast<double>(total),
                  static_cast<unsigned long long>(found), rate,
                  rate > 0 ? static_cast<double>(total - scanned) / rate : 0.0);
    log_line(LogLevel::kInfo, line);
  };
  const std::vector<SsdEntry> entries = store_->scan(limit, progress);
  restore_seconds_ = std::chrono::duration<double>(Clock::now() - start).count();
  high_water_ = 0;
  for (const auto& e : entries) high_water_ = std::max<int64_t>(high_water_, e.slot + 1);
  note_high_water(high_water_, true);
  if (entries.empty()) return 0;
  std::vector<BlockKey> keys, parents;
  std::vector<int64_t> positions;
  std::vector<int32_t> slots;
  for (const auto& e : entries) {
    keys.push_back(e.key);
    parents.push_back(e.parent);
    positions.push_back(e.position);
    slots.push_back(e.slot);
  }
  std::vector<int32_t> left_out;
  const size_t restored = index_.restore(keys.data(), parents.data(), positions.data(), slots.data(), keys.size(),
                                         &left_out);
  if (!left_out.empty()) store_->invalidate(left_out.data(), left_out.size());
  restore_seconds_ = std::chrono::duration<double>(Clock::now() - start).count();
  return static_cast<int64_t>(restored);
}

void SsdTier::note_high_water(int64_t end, bool force) {
  std::lock_guard<std::mutex> g(mark_mu_);
  high_water_ = std::max(high_water_, end);
  if (!force && high_water_ <= persisted_) return;
  // Written before the slots it covers, rounded up, so the mark is never behind the disk.
  const int64_t target = (high_water_ + kWatermarkStep - 1) / kWatermarkStep * kWatermarkStep;
  // Owner-only (0600) like every file of the tier; a stale .tmp of any mode is replaced, not reused.
  const std::string tmp = watermark_path_ + ".tmp";
  const std::string text = std::to_string(target);
  ::unlink(tmp.c_str());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  bool ok = fd >= 0 && ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  if (fd >= 0) ok = ::close(fd) == 0 && ok;
  if (ok && std::rename(tmp.c_str(), watermark_path_.c_str()) == 0) {
    persisted_ = target;
  } else {  // only costs a longer scan at the next start
    persisted_ = high_water_;
    log_line(LogLevel::kWarning, "SSD tier: cannot record the written-slot mark in " + watermark_path_);
  }
}

std::vector<SsdBlock> SsdTier::blocks_of(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots,
                                         const KeyRun& run, const int64_t* positions, size_t n) const {
  std::vector<SsdBlock> blocks(n);
  for (size_t k = 0; k < n; ++k) {
    const auto p = static_cast<size_t>(positions[k]);
    const int64_t* tokens = run.tokens_of(p);
    BlockKey parent = run.seed;
    index_.parent_key(slots[k], &parent);
    blocks[k] = SsdBlock{slots[k], run.keys[p], parent, index_.depth(slots[k]),
                         tokens != nullptr ? tokens : zero_tokens_.data(), cpu.block(cpu_ids[k])};
  }
  return blocks;
}

SsdBatchResult SsdTier::write(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots, const KeyRun& run,
                              const int64_t* positions, size_t n) {
  SsdBatchResult r;
  r.status.assign(n, SsdStatus::kIoError);
  if (n == 0) return r;
  if (!store_) throw std::runtime_error("the SSD tier is closed");
  int32_t top = 0;
  for (size_t k = 0; k < n; ++k) top = std::max(top, slots[k]);
  note_high_water(int64_t{top} + 1, false);
  const std::vector<SsdBlock> blocks = blocks_of(cpu, cpu_ids, slots, run, positions, n);
  store_->write(blocks.data(), n, r.status.data());
  return r;
}

SsdBatchResult SsdTier::read(const CpuTier& cpu, const int32_t* cpu_ids, const int32_t* slots, const KeyRun& run,
                             const int64_t* positions, size_t n) {
  SsdBatchResult r;
  r.status.assign(n, SsdStatus::kIoError);
  if (n == 0) return r;
  if (!store_) throw std::runtime_error("the SSD tier is closed");
  const std::vector<SsdBlock> blocks = blocks_of(cpu, cpu_ids, slots, run, positions, n);
  store_->read(blocks.data(), n, r.status.data());
  return r;
}

void SsdTier::reset() {
  index_.reset();
  int64_t end = 0;
  {
    std::lock_guard<std::mutex> g(mark_mu_);
    end = std::min<int64_t>(high_water_, options_.num_blocks);
  }
  if (!store_ || end <= 0) return;
  std::vector<int32_t> slots(static_cast<size_t>(end));
  std::iota(slots.begin(), slots.end(), 0);
  store_->invalidate(slots.data(), slots.size());
}

void SsdTier::drop(const int32_t* slots, size_t n) {
  if (n == 0) return;
  index_.set_ready(slots, n, false);
  if (store_) store_->invalidate(slots, n);
}

}  // namespace flexkv
