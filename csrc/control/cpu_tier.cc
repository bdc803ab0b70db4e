#include "control/cpu_tier.h"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <random>

#include "control/log.h"

namespace flexkv {
namespace {

uint64_t pid_namespace() {
  struct stat st {};
  return ::stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

bool alive(long pid) { return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM; }

std::string new_segment_name() {
  std::random_device rd;
  std::mt19937_64 rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
  char tag[16];
  std::snprintf(tag, sizeof tag, "%012llx", static_cast<unsigned long long>(rng() & 0xffffffffffffull));
  return "/flexkv-" + std::to_string(pid_namespace()) + "-" + std::to_string(::getpid()) + "-" + tag;
}

// Parses "flexkv-<digits>-<digits>-<12 hex>" into (namespace, pid).
bool parse_segment_name(const std::string& name, uint64_t* ns, long* pid) {
  const std::string prefix = "flexkv-";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size();
  auto digits = [&](uint64_t* out) {
    const size_t from = i;
    uint64_t v = 0;
    while (i < name.size() && name[i] >= '0' && name[i] <= '9' && i - from < 19) v = v * 10 + uint64_t(name[i++] - '0');
    *out = v;
    return i > from && i < name.size() && name[i++] == '-';
  };
  uint64_t p = 0;
  if (!digits(ns) || !digits(&p)) return false;
  if (name.size() - i != 12) return false;
  for (; i < name.size(); ++i) {
    const char c = name[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  *pid = static_cast<long>(p);
  return true;
}

uint64_t round_up(uint64_t v, uint64_t align) { return align <= 1 ? v : (v + align - 1) / align * align; }

}  // namespace

CpuTier::CpuTier(int64_t num_blocks, uint64_t block_bytes, uint64_t block_align, double evict_ratio, bool huge_pages)
    : num_blocks_(num_blocks),
      block_bytes_(block_bytes),
      block_stride_(round_up(block_bytes, block_align)),
      shm_((remove_orphaned_segments(),
            ShmRegion::create(new_segment_name(), static_cast<size_t>(num_blocks) * block_stride_, huge_pages))),
      index_(static_cast<int32_t>(num_blocks), evict_ratio) {}

std::vector<std::string> remove_orphaned_segments(const std::string& shm_dir) {
  std::vector<std::string> removed;
  const uint64_t own = pid_namespace();
  if (own == 0) return removed;
  DIR* dir = ::opendir(shm_dir.c_str());
  if (dir == nullptr) return removed;
  while (dirent* e = ::readdir(dir)) {
    const std::string name = e->d_name;
    uint64_t ns = 0;
    long pid = 0;
    if (!parse_segment_name(name, &ns, &pid) || ns != own || alive(pid)) continue;
    if (::unlink((shm_dir + "/" + name).c_str()) == 0) removed.push_back(name);
  }
  ::closedir(dir);
  if (!removed.empty()) {
    std::string list;
    for (const auto& n : removed) list += (list.empty() ? "" : ", ") + n;
    log_line(LogLevel::kInfo, "removed " + std::to_string(removed.size()) +
                                  " shared-memory segment(s) left by exited processes: " + list);
  }
  return removed;
}

}  // namespace flexkv
