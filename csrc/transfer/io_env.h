// IoEnv: every file operation of the SSD tier goes through this interface
// (the model is LevelDB's Env), so tests can swap in a FaultInjectingEnv that
// fails, or tears, chosen requests.
//
// Two implementations move the bytes: io_uring (one ring per concurrent run()
// call, queue kept full) and a small pool of threads doing preadv/pwritev (the
// fallback where io_uring is not available, e.g. blocked by a container's
// seccomp profile or kernel.io_uring_disabled).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

namespace flexkv {

struct IoRequest {
  int fd;
  uint64_t offset;
  const struct iovec* iov;
  int iovcnt;  // at most IOV_MAX (1024)
  bool write;
};

// Optional per-request callbacks of IoEnv::run_with_hooks. They let a caller
// overlap its own work with the I/O: fill a request's buffers just before it is
// submitted, check them as soon as it has finished. Either may be empty. They
// may run on any thread, concurrently for different requests, and must not throw.
struct IoHooks {
  std::function<void(size_t request)> prepare;
  std::function<void(size_t request, int64_t result)> complete;
};

class IoEnv {
 public:
  virtual ~IoEnv() = default;
  virtual std::string name() const = 0;  // "io_uring", "threads", "fault(<base>)"
  // Runs every request (readv/writev at offset; buffers and offsets 4096-aligned for O_DIRECT) and stores
  // per request the bytes moved or -errno. Blocks until all finished. Thread-safe. Short transfers are
  // retried until complete or an error; a read that reaches the end of the file stores the bytes it got.
  virtual void run(const IoRequest* reqs, size_t n, int64_t* results) = 0;
  // run() with hooks: prepare(i) is called before request i is submitted, complete(i, results[i]) once it
  // has finished. The default calls every prepare, then run(), then every complete; the built-in envs
  // interleave them with the I/O.
  virtual void run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) {
    if (hooks.prepare)
      for (size_t i = 0; i < n; ++i) hooks.prepare(i);
    run(reqs, n, results);
    if (hooks.complete)
      for (size_t i = 0; i < n; ++i) hooks.complete(i, results[i]);
  }
  // Opens (creating it owner-only, 0600, if missing) a file with O_DIRECT|O_RDWR and preallocates it to
  // `size` bytes (fallocate; ENOSPC and EOPNOTSUPP are reported). Throws std::runtime_error naming the
  // path, the errno text and the remedy (e.g. "the filesystem does not support O_DIRECT (tmpfs?); put ssd_cache_dir on a disk").
  virtual int open_file(const std::string& path, uint64_t size) = 0;
  virtual void close_file(int fd) = 0;
};

std::unique_ptr<IoEnv> make_uring_env(unsigned queue_depth);  // throws std::runtime_error if io_uring cannot be set up
std::unique_ptr<IoEnv> make_thread_env(int threads);          // pread/pwrite(v) on a small thread pool
// io_uring, or the thread env when io_uring cannot be set up; *fallback_reason says why (empty if none).
std::unique_ptr<IoEnv> make_default_env(unsigned queue_depth, int threads, std::string* fallback_reason);

// Wraps another env and fails or tears chosen requests. Counters are per kind
// (reads, writes) and count requests, not blocks.
class FaultInjectingEnv : public IoEnv {
 public:
  explicit FaultInjectingEnv(std::unique_ptr<IoEnv> base);

  // After `after` more successful requests of that kind, fail the next `count` (-1: all) with -err.
  // A failed request does not reach the base env.
  void fail_writes(int err, int64_t after, int64_t count);
  void fail_reads(int err, int64_t after, int64_t count);
  // The next `count` (-1: all) writes report success but only their first half (rounded down to
  // 4096 bytes) reaches the file (a torn write).
  void tear_writes(int64_t count);
  void fail_open(int err);  // open_file throws as the base would for this errno (until clear())
  void clear();

  std::string name() const override;
  void run(const IoRequest* reqs, size_t n, int64_t* results) override;
  void run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) override;
  int open_file(const std::string& path, uint64_t size) override;
  void close_file(int fd) override;

 private:
  struct Rule {
    int err = 0;
    int64_t after = 0;
    int64_t count = 0;  // 0: inactive
  };
  std::unique_ptr<IoEnv> base_;
  std::mutex mu_;
  Rule writes_, reads_;
  int64_t tear_ = 0;
  int open_err_ = 0;
};

// Shared by the envs (defined in io_env_threads.cc).
namespace io_detail {
// The open_file of both built-in envs: open(O_CREAT|O_RDWR|O_DIRECT|O_CLOEXEC) + fallocate.
int open_direct_file(const std::string& path, uint64_t size);
// The exception open_file throws for errno `err` on `path`: the path, the errno text and the remedy.
std::runtime_error open_file_error(const std::string& path, uint64_t size, int err);
// One request done synchronously with preadv/pwritev, short transfers retried. Returns bytes or -errno.
int64_t run_request_sync(const IoRequest& req);
}  // namespace io_detail

}  // namespace flexkv
