// ShmRegion: a POSIX shared-memory segment that holds a host tier's blocks, so
// that engine worker processes can map the same bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
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

  // The mapped bytes; null after close().
  uint8_t* data() const { return mapping_ ? mapping_->data : nullptr; }
  size_t size() const { return mapping_ ? mapping_->size : 0; }
  const std::string& name() const { return name_; }
  bool owner() const { return owner_; }
  // Shares ownership of the mapping: it stays mapped while any holder lives,
  // even after close() (views handed to Python hold one).
  std::shared_ptr<const void> mapping() const { return mapping_; }
  // Drops this region's hold on the mapping (unmapped when the last holder
  // goes) and removes the name if this region created it. Idempotent.
  void close();

 private:
  struct Mapping {
    uint8_t* data;
    size_t size;
    ~Mapping();
  };
  ShmRegion(std::string name, uint8_t* data, size_t size, bool owner)
      : name_(std::move(name)), mapping_(new Mapping{data, size}), owner_(owner) {}

  std::string name_;
  std::shared_ptr<Mapping> mapping_;
  bool owner_ = false;
};

}  // namespace flexkv
