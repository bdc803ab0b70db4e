#include "pool/shm_region.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace flexkv {
namespace {

std::runtime_error shm_error(const std::string& what, const std::string& name, int err) {
  return std::runtime_error(what + " shared memory segment '" + name + "': " + std::strerror(err));
}

}  // namespace

ShmRegion ShmRegion::create(const std::string& name, size_t bytes, bool huge_pages) {
  if (name.empty() || name[0] != '/') throw std::invalid_argument("shm name must start with '/': " + name);
  if (bytes == 0) throw std::invalid_argument("shm segment '" + name + "' must not be empty");
  int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0) throw shm_error("cannot create", name, errno);
  // Reserve the pages now: a tmpfs that is too small then fails here with a
  // clear error instead of killing the process with SIGBUS on first write.
  int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (rc != 0) {
    ::close(fd);
    ::shm_unlink(name.c_str());
    throw std::runtime_error("cannot reserve " + std::to_string(bytes) + " bytes for shared memory segment '" +
                             name + "': " + std::strerror(rc) +
                             " (is /dev/shm large enough? lower num_cpu_blocks or cpu_cache_gb)");
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) {
    ::shm_unlink(name.c_str());
    throw shm_error("cannot map", name, err);
  }
  if (huge_pages) ::madvise(p, bytes, MADV_HUGEPAGE);
  return ShmRegion(name, static_cast<uint8_t*>(p), bytes, true);
}

ShmRegion ShmRegion::open(const std::string& name) {
  int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  if (fd < 0) throw shm_error("cannot open", name, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw shm_error("cannot stat", name, err);
  }
  const size_t bytes = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  int err = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw shm_error("cannot map", name, err);
  return ShmRegion(name, static_cast<uint8_t*>(p), bytes, false);
}

ShmRegion::Mapping::~Mapping() {
  if (data != nullptr) ::munmap(data, size);
}

ShmRegion::ShmRegion(ShmRegion&& o) noexcept
    : name_(std::move(o.name_)), mapping_(std::move(o.mapping_)), owner_(std::exchange(o.owner_, false)) {}

ShmRegion& ShmRegion::operator=(ShmRegion&& o) noexcept {
  if (this != &o) {
    close();
    name_ = std::move(o.name_);
    mapping_ = std::move(o.mapping_);
    owner_ = std::exchange(o.owner_, false);
  }
  return *this;
}

ShmRegion::~ShmRegion() { close(); }

void ShmRegion::close() {
  mapping_.reset();
  if (owner_) {
    ::shm_unlink(name_.c_str());
    owner_ = false;
  }
}

}  // namespace flexkv
