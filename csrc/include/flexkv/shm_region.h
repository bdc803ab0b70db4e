// ShmRegion: a POSIX shared-memory segment that holds a host tier's blocks, so
// that engine worker processes can map the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace flexkv {

class ShmRegion {
 public:
  // Creates (and owns) a new segment of `bytes` bytes. With huge_pages, the
  // mapping asks for transparent huge pages. Throws std::runtime_error naming
  // the segment and the cause (for example /dev/shm too small).
  static ShmRegion create(const std::string& name, size_t bytes, bool huge_pages);
  // Maps an existing segment created by another process.
  static ShmRegion open(const std::string& name);

  ShmRegion(ShmRegion&& o) noexcept;
  ShmRegion& operator=(ShmRegion&& o) noexcept;
  ShmRegion(const ShmRegion&) = delete;
  ShmRegion& operator=(const ShmRegion&) = delete;
  ~ShmRegion();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }
  // Unmaps, and removes the name if this region created it. Idempotent.
  void close();

 private:
  ShmRegion(std::string name, uint8_t* data, size_t size, bool owner)
      : name_(std::move(name)), data_(data), size_(size), owner_(owner) {}

  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool owner_ = false;
};

}  // namespace flexkv
