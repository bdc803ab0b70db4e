// The io_uring IoEnv. Each run() call borrows a ring of its own from a small
// pool (so concurrent callers never share a submission queue and need no
// cross-thread completion routing), keeps up to queue_depth requests in flight,
// refills the queue as completions arrive and only then runs the caller's
// completion hooks, so checking one request overlaps the I/O of the others.
#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "transfer/io_env.h"

namespace flexkv {
namespace {

constexpr unsigned kMaxEntries = 32768;  // the kernel's IORING_MAX_ENTRIES
constexpr int kMaxRetries = 1000;        // resubmissions of one request after -EAGAIN / -EINTR
constexpr size_t kMaxRings = 64;         // rings of one env (one per concurrent run() call)

std::string uring_hint(int err) {
  switch (err) {
    case ENOSYS:
      return "this kernel has no io_uring (Linux >= 5.1 is needed)";
    case EPERM:
    case EACCES:
      return "io_uring is disabled here (sysctl kernel.io_uring_disabled, or a container seccomp profile)";
    case ENOMEM:
      return "not enough locked memory for the ring; raise ulimit -l or lower ssd_cache_iouring_entries";
    case EINVAL:
      return "the kernel rejected the ring parameters; lower ssd_cache_iouring_entries";
    default:
      return "io_uring is not usable on this system";
  }
}

struct Ring {
  struct io_uring ring;
  bool live = false;  // set once io_uring_queue_init succeeded
  ~Ring() {
    if (live) io_uring_queue_exit(&ring);
  }
};

// Returns a new ring, or null with *err set.
std::unique_ptr<Ring> new_ring(unsigned entries, int* err) {
  auto r = std::make_unique<Ring>();
  std::memset(&r->ring, 0, sizeof(r->ring));
  const int rc = io_uring_queue_init(entries, &r->ring, 0);
  if (rc < 0) {
    *err = -rc;
    return nullptr;
  }
  r->live = true;
  return r;
}

class UringEnv : public IoEnv {
 public:
  explicit UringEnv(unsigned queue_depth) {
    if (queue_depth == 0) throw std::invalid_argument("io_uring queue depth must be at least 1");
    depth_ = queue_depth > kMaxEntries ? kMaxEntries : queue_depth;
    int err = 0;
    std::unique_ptr<Ring> r = new_ring(depth_, &err);
    if (!r) {
      throw std::runtime_error("io_uring_queue_init(" + std::to_string(depth_) + ") failed: " + std::strerror(err) +
                               " (" + uring_hint(err) + ")");
    }
    struct io_uring_probe* probe = io_uring_get_probe_ring(&r->ring);
    const bool ok = probe != nullptr && io_uring_opcode_supported(probe, IORING_OP_READV) &&
                    io_uring_opcode_supported(probe, IORING_OP_WRITEV);
    if (probe != nullptr) io_uring_free_probe(probe);
    if (!ok) throw std::runtime_error("io_uring does not support READV/WRITEV here (" + uring_hint(0) + ")");
    free_.push_back(std::move(r));
    rings_ = 1;
  }

  std::string name() const override { return "io_uring"; }

  void run(const IoRequest* reqs, size_t n, int64_t* results) override {
    run_with_hooks(reqs, n, results, IoHooks{});
  }

  void run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) override;

  int open_file(const std::string& path, uint64_t size) override { return io_detail::open_direct_file(path, size); }
  void close_file(int fd) override {
    if (fd >= 0) ::close(fd);
  }

 private:
  // A ring for one run(), or null with *err set when none exists and none can be made.
  std::unique_ptr<Ring> acquire(int* err) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (!free_.empty()) {
        std::unique_ptr<Ring> r = std::move(free_.back());
        free_.pop_back();
        return r;
      }
      // Past a failed creation, share the rings there are (e.g. the locked-memory limit); with none
      // left (broken rings are dropped), try again rather than wait for a ring that cannot come.
      if (rings_ < kMaxRings && (!create_failed_ || rings_ == 0)) {
        ++rings_;
        lock.unlock();
        std::unique_ptr<Ring> r = new_ring(depth_, err);
        if (r) return r;
        lock.lock();
        --rings_;
        create_failed_ = true;
        if (rings_ == 0) return nullptr;
        continue;
      }
      cv_.wait(lock);
    }
  }

  void release(std::unique_ptr<Ring> r) {
    std::lock_guard<std::mutex> lock(mu_);
    if (r) {
      free_.push_back(std::move(r));
    } else {
      --rings_;  // a broken ring was dropped
    }
    cv_.notify_one();
  }

  unsigned depth_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Ring>> free_;
  size_t rings_ = 0;
  bool create_failed_ = false;
};

void UringEnv::run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) {
  if (n == 0) return;
  int ring_err = 0;
  std::unique_ptr<Ring> holder = acquire(&ring_err);
  if (!holder) {  // no ring at all: every request fails, nothing was submitted
    for (size_t i = 0; i < n; ++i) {
      results[i] = -static_cast<int64_t>(ring_err ? ring_err : EIO);
      if (hooks.complete) hooks.complete(i, results[i]);
    }
    return;
  }
  struct io_uring* ring = &holder->ring;

  struct Op {
    uint64_t total = 0;
    uint64_t done = 0;
    int retries = 0;
    bool finished = false;
    std::vector<struct iovec> rest;  // what is left after a short transfer
  };
  std::vector<Op> ops(n);
  std::vector<size_t> retry;                         // requests to submit again
  std::vector<std::pair<size_t, int64_t>> finished;  // finished, complete hook not run yet
  size_t next = 0;         // the next request never submitted
  size_t outstanding = 0;  // queued in the SQ or in the kernel
  size_t num_finished = 0;

  auto finish = [&](size_t i, int64_t r) {
    results[i] = r;
    ops[i].finished = true;
    ++num_finished;
    if (hooks.complete) finished.emplace_back(i, r);
  };
  auto queue = [&](size_t i) {
    struct io_uring_sqe* sqe = io_uring_get_sqe(ring);  // never null: outstanding < depth_ <= SQ entries
    const IoRequest& q = reqs[i];
    Op& op = ops[i];
    const struct iovec* iov = op.done ? op.rest.data() : q.iov;
    const unsigned cnt = op.done ? static_cast<unsigned>(op.rest.size()) : static_cast<unsigned>(q.iovcnt);
    if (q.write) {
      io_uring_prep_writev(sqe, q.fd, iov, cnt, q.offset + op.done);
    } else {
      io_uring_prep_readv(sqe, q.fd, iov, cnt, q.offset + op.done);
    }
    io_uring_sqe_set_data64(sqe, i);
    ++outstanding;
  };
  auto fill = [&] {
    while (outstanding < depth_) {
      if (!retry.empty()) {
        queue(retry.back());
        retry.pop_back();
        continue;
      }
      if (next == n) break;
      const size_t i = next++;
      const IoRequest& q = reqs[i];
      if (q.iovcnt < 0 || q.iovcnt > IOV_MAX) {
        finish(i, -EINVAL);
        continue;
      }
      uint64_t total = 0;
      for (int k = 0; k < q.iovcnt; ++k) total += q.iov[k].iov_len;
      if (total == 0) {
        finish(i, 0);
        continue;
      }
      ops[i].total = total;
      if (hooks.prepare) {
        hooks.prepare(i);
        queue(i);
        io_uring_submit(ring);  // start it while the next one is prepared (errors surface at the wait)
      } else {
        queue(i);
      }
    }
  };
  auto handle = [&](size_t i, int res) {
    --outstanding;
    Op& op = ops[i];
    if ((res == -EINTR || res == -EAGAIN) && op.retries < kMaxRetries) {
      ++op.retries;
      retry.push_back(i);
    } else if (res < 0) {
      finish(i, res);
    } else if (res == 0) {
      finish(i, static_cast<int64_t>(op.done));  // end of file: a short read
    } else {
      op.done += static_cast<uint64_t>(res);
      if (op.done >= op.total) {
        finish(i, static_cast<int64_t>(op.total));
        return;
      }
      std::vector<struct iovec> rest;
      uint64_t skip = op.done;
      const IoRequest& q = reqs[i];
      for (int k = 0; k < q.iovcnt; ++k) {
        const uint64_t len = q.iov[k].iov_len;
        if (skip >= len) {
          skip -= len;
          continue;
        }
        rest.push_back({static_cast<char*>(q.iov[k].iov_base) + skip, static_cast<size_t>(len - skip)});
        skip = 0;
      }
      op.rest = std::move(rest);
      retry.push_back(i);
    }
  };
  auto run_hooks = [&] {
    for (auto& [i, r] : finished) hooks.complete(i, r);
    finished.clear();
  };
  auto reap = [&] {
    struct io_uring_cqe* cqe;
    unsigned head;
    unsigned seen = 0;
    io_uring_for_each_cqe(ring, head, cqe) {
      handle(static_cast<size_t>(io_uring_cqe_get_data64(cqe)), cqe->res);
      ++seen;
    }
    io_uring_cq_advance(ring, seen);
  };

  int fatal = 0;
  while (num_finished < n) {
    fill();
    if (io_uring_sq_ready(ring) > 0) {
      const int rc = io_uring_submit(ring);
      if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
        fatal = -rc;
        break;
      }
    }
    run_hooks();  // the queue is full again: check finished requests while the device works
    if (num_finished == n) break;
    if (outstanding == 0) continue;
    int rc = io_uring_submit_and_wait(ring, 1);
    if (rc == -EAGAIN || rc == -EBUSY) {
      // The kernel is short of resources: wait for something in flight, or try again shortly.
      if (outstanding > io_uring_sq_ready(ring)) {
        struct io_uring_cqe* cqe;
        rc = io_uring_wait_cqe(ring, &cqe);
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        rc = 0;
      }
    }
    if (rc < 0 && rc != -EINTR) {
      fatal = -rc;
      break;
    }
    reap();
  }
  run_hooks();

  if (fatal != 0) {
    // The ring is unusable. Wait for what the kernel has taken (it writes into the caller's buffers), fail the
    // rest and drop the ring.
    size_t in_kernel = outstanding - io_uring_sq_ready(ring);
    while (in_kernel > 0) {
      struct io_uring_cqe* cqe;
      const int rc = io_uring_wait_cqe(ring, &cqe);
      if (rc == -EINTR) continue;
      if (rc < 0) break;
      const size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;  // read before the entry goes back to the kernel
      io_uring_cqe_seen(ring, cqe);
      --in_kernel;
      --outstanding;
      if (!ops[i].finished) finish(i, res < 0 ? res : -EIO);
    }
    for (size_t i = 0; i < n; ++i) {
      if (!ops[i].finished) finish(i, -static_cast<int64_t>(fatal));
    }
    run_hooks();
    holder.reset();
  }
  release(std::move(holder));
}

}  // namespace

std::unique_ptr<IoEnv> make_uring_env(unsigned queue_depth) { return std::make_unique<UringEnv>(queue_depth); }

std::unique_ptr<IoEnv> make_default_env(unsigned queue_depth, int threads, std::string* fallback_reason) {
  if (fallback_reason) fallback_reason->clear();
  try {
    return make_uring_env(queue_depth);
  } catch (const std::runtime_error& e) {
    if (fallback_reason) *fallback_reason = e.what();
  }
  return make_thread_env(threads);
}

}  // namespace flexkv
