// MemfdRegion: anonymous shared memory (memfd_create) that holds a host tier's
// blocks. It has no name in any filesystem: other processes of the same user
// get its descriptor over a socket (region_share.h), and the kernel frees the
// memory once the last descriptor and the last mapping are gone, so no crash,
// SIGKILL or force-kill of any process can leave it behind.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace flexkv {

class MemfdRegion {
 public:
  // Creates `bytes` bytes of memory, reserved up front (fallocate), so a
  // machine that lacks the memory fails here with a clear error instead of a
  // SIGBUS on first write. With huge_pages it takes hugetlb pages
  // (MFD_HUGETLB; the size is rounded up to whole huge pages) when enough of
  // them are free, else ordinary pages with transparent huge pages asked for
  // (MADV_HUGEPAGE); `note` (if given) then says why. Ordinary pages are
  // refused up front when more than host_memory_room() is asked for. Throws
  // std::runtime_error naming the cause (the caller adds the config key).
  // The descriptor is close-on-exec; the region keeps it until close().
  static MemfdRegion create(const std::string& label, size_t bytes, bool huge_pages, std::string* note = nullptr);
  // Maps the memory behind `fd` (a descriptor received from the owner), which
  // must hold exactly `bytes` bytes. Does not keep or close `fd`.
  static MemfdRegion map(int fd, size_t bytes);

  MemfdRegion() = default;
  MemfdRegion(MemfdRegion&& o) noexcept;
  MemfdRegion& operator=(MemfdRegion&& o) noexcept;
  MemfdRegion(const MemfdRegion&) = delete;
  MemfdRegion& operator=(const MemfdRegion&) = delete;
  ~MemfdRegion();

  // The mapped bytes; null after close().
  uint8_t* data() const { return mapping_ ? mapping_->data : nullptr; }
  size_t size() const { return mapping_ ? mapping_->size : 0; }
  // The memfd (created regions only; -1 for mapped ones and after close()).
  int fd() const { return fd_; }
  // True when the memory is hugetlb pages (MFD_HUGETLB).
  bool hugetlb() const { return hugetlb_; }
  // Shares ownership of the mapping: it stays mapped while any holder lives,
  // even after close() (views handed to Python hold one).
  std::shared_ptr<const void> mapping() const { return mapping_; }
  // Another hold on this region's mapping, without the descriptor: how a
  // mapper in the owner's own process shares the owner's page tables.
  MemfdRegion alias() const;
  // Enters every page of the mapping into this process's page tables on a
  // background thread of low priority, without changing its contents, so that
  // copies into blocks do not pay a page fault per 4 KiB page on first touch
  // (about 1.5 us each: a 1 MiB store into fresh pages costs several times its
  // memcpy). Returns at once; the thread stops early when the mapping goes.
  // Hugetlb regions fault per huge page and are left alone.
  void prefault_in_background() const;
  // Drops this region's hold on the mapping (unmapped when the last holder
  // goes) and closes the descriptor. Idempotent.
  void close();

 private:
  struct Mapping {
    uint8_t* data;
    size_t size;
    ~Mapping();
  };
  MemfdRegion(uint8_t* data, size_t size, int fd, bool hugetlb)
      : mapping_(new Mapping{data, size}), fd_(fd), hugetlb_(hugetlb) {}

  std::shared_ptr<Mapping> mapping_;
  int fd_ = -1;
  bool hugetlb_ = false;
};

// Bytes of ordinary memory this process can still take: MemAvailable, capped
// by the room left under its memory cgroup's limit (v2 memory.max or v1
// memory.limit_in_bytes) when one is set; nullopt when neither can be read.
// memfd memory counts against both (not against /dev/shm's size).
std::optional<uint64_t> host_memory_room();

}  // namespace flexkv
