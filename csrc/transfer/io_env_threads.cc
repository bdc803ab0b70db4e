// The thread-pool IoEnv (preadv/pwritev) and the POSIX pieces every env shares:
// opening a preallocated O_DIRECT file and the error messages of doing so.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "transfer/io_env.h"

namespace flexkv {
namespace io_detail {
namespace {

std::string remedy_for(int err) {
  switch (err) {
    case EINVAL:
      return "the filesystem does not support O_DIRECT (tmpfs?); put ssd_cache_dir on a disk";
    case ENOSPC:
    case EDQUOT:
      return "not enough free space to preallocate the file; free space, lower num_ssd_blocks (ssd_cache_gb) "
             "or put ssd_cache_dir on a larger disk";
    case EOPNOTSUPP:
      return "the filesystem cannot preallocate files (fallocate); put ssd_cache_dir on a local ext4 or xfs disk";
    case EACCES:
    case EPERM:
    case EROFS:
      return "the directory is not writable; make it writable for this user or choose another ssd_cache_dir";
    case ENOENT:
    case ENOTDIR:
      return "the directory does not exist; create it or choose another ssd_cache_dir";
    case EMFILE:
    case ENFILE:
      return "too many open files; raise the open-file limit (ulimit -n) or use fewer, larger files "
             "(max_file_bytes = 0)";
    case EFBIG:
      return "the file would exceed the filesystem's maximum file size; set max_file_bytes to split it";
    default:
      return "check that ssd_cache_dir is a writable directory on a local disk";
  }
}

}  // namespace

std::runtime_error open_file_error(const std::string& path, uint64_t size, int err) {
  const bool prealloc = err == ENOSPC || err == EDQUOT || err == EOPNOTSUPP || err == EFBIG;
  std::string what = prealloc ? "cannot preallocate " + std::to_string(size) + " bytes for SSD cache file "
                              : "cannot open SSD cache file ";
  return std::runtime_error(what + path + ": " + std::strerror(err) + "; " + remedy_for(err));
}

int open_direct_file(const std::string& path, uint64_t size) {
  // Created owner-only: the slots hold token ids of users' prompts. An existing file is used as it is.
  int fd = ::open(path.c_str(), O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
  if (fd < 0) throw open_file_error(path, size, errno);
  if (size > 0) {
    int rc;
    do {
      rc = ::fallocate(fd, 0, 0, static_cast<off_t>(size));
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
      const int err = errno;
      ::close(fd);
      throw open_file_error(path, size, err);
    }
  }
  return fd;
}

int64_t run_request_sync(const IoRequest& req) {
  if (req.iovcnt < 0) return -EINVAL;
  uint64_t total = 0;
  for (int i = 0; i < req.iovcnt; ++i) total += req.iov[i].iov_len;
  if (total == 0) return 0;
  const struct iovec* iov = req.iov;
  int cnt = req.iovcnt;
  std::vector<struct iovec> rest;  // the remainder after a short transfer
  uint64_t done = 0;
  for (;;) {
    const off_t off = static_cast<off_t>(req.offset + done);
    ssize_t k = req.write ? ::pwritev(req.fd, iov, cnt, off) : ::preadv(req.fd, iov, cnt, off);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -static_cast<int64_t>(errno);
    }
    if (k == 0) return static_cast<int64_t>(done);  // end of file: a short read
    done += static_cast<uint64_t>(k);
    if (done >= total) return static_cast<int64_t>(total);
    // Skip the bytes moved so far and go on with what is left.
    rest.clear();
    uint64_t skip = done;
    for (int i = 0; i < req.iovcnt; ++i) {
      const uint64_t len = req.iov[i].iov_len;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      rest.push_back({static_cast<char*>(req.iov[i].iov_base) + skip, static_cast<size_t>(len - skip)});
      skip = 0;
    }
    iov = rest.data();
    cnt = static_cast<int>(rest.size());
  }
}

}  // namespace io_detail

namespace {

class ThreadEnv : public IoEnv {
 public:
  explicit ThreadEnv(int threads) {
    if (threads < 1) throw std::invalid_argument("the thread I/O env needs at least one thread");
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~ThreadEnv() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  std::string name() const override { return "threads"; }

  void run(const IoRequest* reqs, size_t n, int64_t* results) override {
    run_with_hooks(reqs, n, results, IoHooks{});
  }

  void run_with_hooks(const IoRequest* reqs, size_t n, int64_t* results, const IoHooks& hooks) override {
    if (n == 0) return;
    Job job{reqs, n, results, &hooks, 0, n};
    std::unique_lock<std::mutex> lock(mu_);
    jobs_.push_back(&job);
    work_cv_.notify_all();
    job_cv_.wait(lock, [&] { return job.remaining == 0; });
  }

  int open_file(const std::string& path, uint64_t size) override { return io_detail::open_direct_file(path, size); }
  void close_file(int fd) override {
    if (fd >= 0) ::close(fd);
  }

 private:
  struct Job {
    const IoRequest* reqs;
    size_t n;
    int64_t* results;
    const IoHooks* hooks;
    size_t next;       // the next request to hand out
    size_t remaining;  // requests not finished yet
  };

  void worker_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, nothing queued
      Job* job = jobs_.front();
      const size_t i = job->next++;
      if (job->next == job->n) jobs_.pop_front();  // every request handed out
      lock.unlock();
      if (job->hooks->prepare) job->hooks->prepare(i);
      const int64_t r = io_detail::run_request_sync(job->reqs[i]);
      job->results[i] = r;
      if (job->hooks->complete) job->hooks->complete(i, r);
      lock.lock();
      if (--job->remaining == 0) job_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable job_cv_;
  std::deque<Job*> jobs_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

}  // namespace

std::unique_ptr<IoEnv> make_thread_env(int threads) { return std::make_unique<ThreadEnv>(threads); }

}  // namespace flexkv
