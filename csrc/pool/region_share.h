// Hands a MemfdRegion's descriptor to other processes of the same user over a
// Unix socket in the abstract namespace (a name that starts with a NUL byte:
// no file anywhere, and it vanishes when the last process holding the socket
// exits). Written "@name" here, as ss(8) prints it.
//
// Protocol: a peer connects and reads; the server answers at once, without
// waiting for a request, with one text line
//   "ok size=<bytes> num_blocks=<n> block_stride=<bytes> block_bytes=<bytes>\n"
// carrying the memfd (SCM_RIGHTS), or "refused <reason>\n" without it, and
// closes the connection. Peers whose SO_PEERCRED uid differs from the owner's
// are refused: the memory is owner-only, as a 0600 file would be.
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>

#include "pool/memfd_region.h"

namespace flexkv {

struct RegionGeometry {
  uint64_t size = 0;  // bytes of the memory (at least num_blocks * block_stride)
  int64_t num_blocks = 0;
  uint64_t block_stride = 0;
  uint64_t block_bytes = 0;
};

class RegionServer {
 public:
  // Binds "@<prefix>-<pid>-<16 random hex>" and starts the answering thread.
  // Keeps its own duplicate of `fd`. owner_uid: the uid peers must have
  // (this process's effective uid unless a test injects another).
  RegionServer(int fd, const RegionGeometry& geometry, const std::string& prefix, uid_t owner_uid = ::geteuid());
  ~RegionServer();
  RegionServer(const RegionServer&) = delete;
  RegionServer& operator=(const RegionServer&) = delete;

  // "@..." (the leading NUL shown as '@').
  const std::string& name() const { return name_; }
  // Connections answered with the descriptor, and refused.
  uint64_t served() const { return served_.load(); }
  uint64_t refused() const { return refused_.load(); }
  // Lets map_shared_region in this process take `owner` (the region whose
  // descriptor this server hands out) instead of mapping the memory a second
  // time: one set of page tables, already entered (see prefault_in_background).
  // Until stop().
  void share_in_process(const MemfdRegion& owner);
  // Stops the thread, unbinds the name and closes the duplicate. Never waits
  // for a peer (every answer is one non-blocking send). Idempotent.
  void stop();

 private:
  void serve();
  void answer(int conn);

  std::string name_;
  RegionGeometry geometry_;
  uid_t owner_uid_;
  int fd_ = -1;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // an eventfd: written by stop() to end the thread's poll
  std::atomic<uint64_t> served_{0};
  std::atomic<uint64_t> refused_{0};
  std::thread thread_;
};

// Connects to the server at `name` ("@..."), receives the descriptor, checks
// the geometry it announces against `expected` (every field), maps the memory,
// closes the descriptor and enters the mapping's pages in the background
// (MemfdRegion::prefault_in_background). Waits at most timeout_s for the
// answer. A server of this process that shares its owner's region
// (share_in_process) gives that region's mapping instead, after the same
// geometry check. Throws std::runtime_error naming the cause and what to do.
MemfdRegion map_shared_region(const std::string& name, const RegionGeometry& expected, double timeout_s);

}  // namespace flexkv
