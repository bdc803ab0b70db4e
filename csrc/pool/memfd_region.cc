#include "pool/memfd_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <thread>
#include <utility>

#ifndef MFD_HUGETLB
#define MFD_HUGETLB 0x0004U
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace flexkv {
namespace {

std::string gib(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(bytes) / (1ull << 30));
  return buf;
}

// The first number on a line of `path` that starts with `prefix` (/proc/meminfo), or of its only line.
std::optional<uint64_t> read_number(const std::string& path, const std::string& prefix = "") {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.compare(0, prefix.size(), prefix) != 0) continue;
    const char* p = line.c_str() + prefix.size();
    while (*p == ' ' || *p == '\t') ++p;
    if (*p < '0' || *p > '9') return std::nullopt;  // "max": no limit
    return std::strtoull(p, nullptr, 10);
  }
  return std::nullopt;
}

int fallocate_all(int fd, size_t bytes) {
  int rc;
  do {
    rc = ::fallocate(fd, 0, 0, static_cast<off_t>(bytes));
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;
}

uint8_t* map_shared(int fd, size_t bytes) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  return p == MAP_FAILED ? nullptr : static_cast<uint8_t*>(p);
}

// Hugetlb memory of `bytes` (rounded up to whole huge pages), or -1 with *why set.
int create_hugetlb(const std::string& label, size_t* bytes, std::string* why) {
  const int fd = ::memfd_create(label.c_str(), MFD_CLOEXEC | MFD_HUGETLB);
  if (fd < 0) {
    *why = std::string("memfd_create(MFD_HUGETLB): ") + std::strerror(errno);
    return -1;
  }
  struct stat st {};
  const size_t page = ::fstat(fd, &st) == 0 && st.st_blksize > 0 ? static_cast<size_t>(st.st_blksize) : 2u << 20;
  const size_t rounded = (*bytes + page - 1) / page * page;
  if (int err = fallocate_all(fd, rounded)) {
    ::close(fd);
    *why = std::to_string(rounded / page) + " huge pages of " + std::to_string(page >> 10) +
           " KiB are not free (" + std::strerror(err) + "; see HugePages_Free in /proc/meminfo)";
    return -1;
  }
  *bytes = rounded;
  return fd;
}

}  // namespace

std::optional<uint64_t> host_memory_room() {
  std::optional<uint64_t> room;
  if (auto kib = read_number("/proc/meminfo", "MemAvailable:")) room = *kib * 1024;
  static const char* const kCgroups[][2] = {
      {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
      {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"}};
  for (const auto& files : kCgroups) {
    std::ifstream probe(files[0]);
    if (!probe) continue;
    const auto limit = read_number(files[0]);
    const auto usage = read_number(files[1]);
    if (limit && usage && *limit < (1ull << 60)) {
      const uint64_t left = *limit > *usage ? *limit - *usage : 0;
      room = room ? std::min(*room, left) : left;
    }
    break;  // the first hierarchy that exists is this process's
  }
  return room;
}

MemfdRegion MemfdRegion::create(const std::string& label, size_t bytes, bool huge_pages, std::string* note) {
  if (bytes == 0) throw std::invalid_argument("a shared memory region must not be empty");
  if (huge_pages) {
    size_t rounded = bytes;
    std::string why;
    const int fd = create_hugetlb(label, &rounded, &why);
    if (fd >= 0) {
      if (uint8_t* p = map_shared(fd, rounded)) return MemfdRegion(p, rounded, fd, true);
      why = std::string("mmap of hugetlb memory: ") + std::strerror(errno);
      ::close(fd);
    }
    if (note != nullptr) {
      *note = "hugetlb pages not used (" + why + "); using ordinary pages with transparent huge pages";
    }
  }
  if (auto room = host_memory_room(); room && bytes > *room) {
    throw std::runtime_error("the memory needs " + gib(bytes) + " but only " + gib(*room) +
                             " is available (MemAvailable, and the room under the memory cgroup's limit)");
  }
  const int fd = ::memfd_create(label.c_str(), MFD_CLOEXEC);
  if (fd < 0) throw std::runtime_error(std::string("memfd_create failed: ") + std::strerror(errno));
  if (int err = fallocate_all(fd, bytes)) {
    ::close(fd);
    throw std::runtime_error("cannot reserve " + gib(bytes) + " of memory: " + std::strerror(err));
  }
  uint8_t* p = map_shared(fd, bytes);
  if (p == nullptr) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(std::string("cannot map the memory: ") + std::strerror(err));
  }
  if (huge_pages) ::madvise(p, bytes, MADV_HUGEPAGE);
  return MemfdRegion(p, bytes, fd, false);
}

MemfdRegion MemfdRegion::map(int fd, size_t bytes) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw std::runtime_error(std::string("cannot stat the memory: ") + std::strerror(errno));
  if (static_cast<uint64_t>(st.st_size) != bytes) {
    throw std::runtime_error("the memory holds " + std::to_string(st.st_size) + " bytes, not the " +
                             std::to_string(bytes) + " its owner announced");
  }
  uint8_t* p = map_shared(fd, bytes);
  if (p == nullptr) throw std::runtime_error(std::string("cannot map the memory: ") + std::strerror(errno));
  return MemfdRegion(p, bytes, -1, false);
}

MemfdRegion MemfdRegion::alias() const {
  MemfdRegion r;
  r.mapping_ = mapping_;
  r.hugetlb_ = hugetlb_;
  return r;
}

void MemfdRegion::prefault_in_background() const {
  if (!mapping_ || hugetlb_) return;
  std::weak_ptr<Mapping> weak = mapping_;
  std::thread([weak] {
    // Below every thread of the engine: a busy machine lets the copies fault pages in themselves.
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 19);
    // Each call holds the process's mmap lock (for reading) while it runs: small chunks keep the engine's own
    // mmap and munmap calls (large tensors) from waiting behind it for more than a fraction of a millisecond.
    constexpr size_t kChunk = size_t{256} << 10;
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    size_t off = 0;
    while (auto m = weak.lock()) {
      if (off >= m->size) return;
      const size_t len = std::min(kChunk, m->size - off);
      if (::madvise(m->data + off, len, MADV_POPULATE_WRITE) != 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        if (errno != EINVAL) return;  // e.g. no memory left: copies fault their pages in as before
        // Kernels before 5.14: a read maps a shared memfd page writable (no write notification on it).
        const volatile uint8_t* bytes = m->data + off;
        for (size_t i = 0; i < len; i += page) static_cast<void>(bytes[i]);
      }
      off += len;
    }
  }).detach();
}

MemfdRegion::Mapping::~Mapping() {
  if (data != nullptr) ::munmap(data, size);
}

MemfdRegion::MemfdRegion(MemfdRegion&& o) noexcept
    : mapping_(std::move(o.mapping_)), fd_(std::exchange(o.fd_, -1)), hugetlb_(o.hugetlb_) {}

MemfdRegion& MemfdRegion::operator=(MemfdRegion&& o) noexcept {
  if (this != &o) {
    close();
    mapping_ = std::move(o.mapping_);
    fd_ = std::exchange(o.fd_, -1);
    hugetlb_ = o.hugetlb_;
  }
  return *this;
}

MemfdRegion::~MemfdRegion() { close(); }

void MemfdRegion::close() {
  mapping_.reset();
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
}

}  // namespace flexkv
