#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "transfer/io_env.h"

using flexkv::IoEnv;
using flexkv::IoHooks;
using flexkv::IoRequest;

namespace {

constexpr size_t kPage = 4096;
constexpr long kTmpfsMagic = 0x01021994;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/flexkv-test-io-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
};

struct Aligned {
  uint8_t* p;
  size_t n;
  explicit Aligned(size_t bytes) : p(static_cast<uint8_t*>(std::aligned_alloc(kPage, bytes))), n(bytes) {
    std::memset(p, 0, bytes);
  }
  ~Aligned() { std::free(p); }
  void randomize(uint32_t seed) {
    std::mt19937 rng(seed);
    for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
  }
};

std::vector<std::unique_ptr<IoEnv>> all_envs() {
  std::vector<std::unique_ptr<IoEnv>> envs;
  envs.push_back(flexkv::make_uring_env(8));
  envs.push_back(flexkv::make_thread_env(3));
  envs.push_back(std::make_unique<flexkv::FaultInjectingEnv>(flexkv::make_uring_env(8)));
  return envs;
}

bool is_tmpfs(const char* path) {
  struct statfs s;
  return ::statfs(path, &s) == 0 && static_cast<long>(s.f_type) == kTmpfsMagic;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string open_error(IoEnv& env, const std::string& path, uint64_t size) {
  try {
    int fd = env.open_file(path, size);
    env.close_file(fd);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(names) {
  CHECK_EQ(flexkv::make_uring_env(4)->name(), "io_uring");
  CHECK_EQ(flexkv::make_thread_env(1)->name(), "threads");
  CHECK_EQ(flexkv::FaultInjectingEnv(flexkv::make_thread_env(1)).name(), "fault(threads)");
  std::string reason = "stale";
  auto env = flexkv::make_default_env(16, 2, &reason);
  CHECK_EQ(env->name(), "io_uring");  // io_uring works on the test machines
  CHECK(reason.empty());
  CHECK_THROWS(flexkv::make_uring_env(0));
  CHECK_THROWS(flexkv::make_thread_env(0));
}

TEST(vectored_round_trip_and_short_read_at_eof) {
  TempDir dir;
  for (auto& env : all_envs()) {
    const std::string path = dir.path + "/f-" + std::to_string(reinterpret_cast<uintptr_t>(env.get()));
    const int fd = env->open_file(path, 64 * kPage);
    struct stat st;
    CHECK(::fstat(fd, &st) == 0 && st.st_size == 64 * static_cast<off_t>(kPage));
    CHECK(st.st_blocks * 512 >= 64 * static_cast<off_t>(kPage));  // preallocated
    // 20 requests of 3 buffers each (1, 2 and 1 pages) at scattered offsets.
    const int n = 16;
    Aligned src(n * 4 * kPage), dst(n * 4 * kPage);
    src.randomize(42);
    std::vector<struct iovec> iov(3 * n), iov2(3 * n);
    std::vector<IoRequest> w(n), r(n);
    for (int i = 0; i < n; ++i) {
      uint8_t* s = src.p + i * 4 * kPage;
      uint8_t* d = dst.p + i * 4 * kPage;
      iov[3 * i] = {s, kPage};
      iov[3 * i + 1] = {s + kPage, 2 * kPage};
      iov[3 * i + 2] = {s + 3 * kPage, kPage};
      iov2[3 * i] = {d, 2 * kPage};
      iov2[3 * i + 1] = {d + 2 * kPage, kPage};
      iov2[3 * i + 2] = {d + 3 * kPage, kPage};
      const uint64_t off = static_cast<uint64_t>((i * 7) % n) * 4 * kPage;
      w[i] = IoRequest{fd, off, &iov[3 * i], 3, true};
      r[i] = IoRequest{fd, off, &iov2[3 * i], 3, false};
    }
    std::vector<int64_t> res(n, -1);
    env->run(w.data(), n, res.data());
    for (int64_t x : res) CHECK_EQ(x, static_cast<int64_t>(4 * kPage));
    env->run(r.data(), n, res.data());
    for (int64_t x : res) CHECK_EQ(x, static_cast<int64_t>(4 * kPage));
    CHECK(std::memcmp(src.p, dst.p, src.n) == 0);
    // A read across the end of the file stops there.
    Aligned big(8 * kPage);
    struct iovec one{big.p, 8 * kPage};
    IoRequest past{fd, 60 * kPage, &one, 1, false};
    int64_t got = 0;
    env->run(&past, 1, &got);
    CHECK_EQ(got, static_cast<int64_t>(4 * kPage));
    IoRequest beyond{fd, 100 * kPage, &one, 1, false};
    env->run(&beyond, 1, &got);
    CHECK_EQ(got, 0);
    // Errors come back per request, the others still run.
    Aligned unaligned_buf(2 * kPage);
    struct iovec bad{unaligned_buf.p + 1, kPage};
    IoRequest mixed[3] = {{fd, 0, &one, 1, false}, {-1, 0, &one, 1, false}, {fd, 0, &bad, 1, false}};
    int64_t mres[3];
    env->run(mixed, 3, mres);
    CHECK_EQ(mres[0], static_cast<int64_t>(8 * kPage));
    CHECK_EQ(mres[1], -EBADF);
    CHECK_EQ(mres[2], -EINVAL);  // O_DIRECT refuses an unaligned buffer
    env->run(nullptr, 0, nullptr);  // nothing to do
    env->close_file(fd);
  }
}

TEST(hooks_prepare_before_submit_and_complete_after) {
  TempDir dir;
  for (auto& env : all_envs()) {
    const std::string path = dir.path + "/h-" + std::to_string(reinterpret_cast<uintptr_t>(env.get()));
    const int fd = env->open_file(path, 200 * kPage);
    const size_t n = 100;  // more than the queue depth of 8
    Aligned buf(n * kPage);
    std::vector<struct iovec> iov(n);
    std::vector<IoRequest> reqs(n);
    for (size_t i = 0; i < n; ++i) {
      iov[i] = {buf.p + i * kPage, kPage};
      reqs[i] = IoRequest{fd, (n - 1 - i) * 2 * kPage, &iov[i], 1, true};
    }
    std::vector<std::atomic<int>> prepared(n), completed(n);
    std::atomic<int> order_errors{0};
    IoHooks hooks;
    hooks.prepare = [&](size_t i) {
      std::memset(buf.p + i * kPage, static_cast<int>(i & 0xff), kPage);  // fill right before the write
      if (completed[i].load() != 0) ++order_errors;
      ++prepared[i];
    };
    hooks.complete = [&](size_t i, int64_t r) {
      if (prepared[i].load() != 1 || r != static_cast<int64_t>(kPage)) ++order_errors;
      ++completed[i];
    };
    std::vector<int64_t> res(n);
    env->run_with_hooks(reqs.data(), n, res.data(), hooks);
    CHECK_EQ(order_errors.load(), 0);
    for (size_t i = 0; i < n; ++i) CHECK(prepared[i].load() == 1 && completed[i].load() == 1);
    // What the hooks wrote is what reached the file.
    std::memset(buf.p, 0xEE, buf.n);
    for (auto& q : reqs) q.write = false;
    env->run(reqs.data(), n, res.data());
    for (size_t i = 0; i < n; ++i) CHECK_EQ(buf.p[i * kPage + 17], static_cast<uint8_t>(i & 0xff));
    env->close_file(fd);
  }
}

TEST(concurrent_callers_share_one_env) {
  TempDir dir;
  for (auto& env : all_envs()) {
    const std::string path = dir.path + "/c-" + std::to_string(reinterpret_cast<uintptr_t>(env.get()));
    const int threads = 4, per = 64;
    const int fd = env->open_file(path, threads * per * kPage);
    std::atomic<int> bad{0};
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        Aligned src(per * kPage), dst(per * kPage);
        src.randomize(static_cast<uint32_t>(t + 1));
        std::vector<struct iovec> a(per), b(per);
        std::vector<IoRequest> w(per), r(per);
        for (int i = 0; i < per; ++i) {
          a[i] = {src.p + i * kPage, kPage};
          b[i] = {dst.p + i * kPage, kPage};
          const uint64_t off = (static_cast<uint64_t>(i) * threads + t) * kPage;  // interleaved with the others
          w[i] = IoRequest{fd, off, &a[i], 1, true};
          r[i] = IoRequest{fd, off, &b[i], 1, false};
        }
        std::vector<int64_t> res(per);
        for (int round = 0; round < 5; ++round) {
          env->run(w.data(), per, res.data());
          for (int64_t x : res) bad += x != static_cast<int64_t>(kPage);
          env->run(r.data(), per, res.data());
          for (int64_t x : res) bad += x != static_cast<int64_t>(kPage);
          bad += std::memcmp(src.p, dst.p, src.n) != 0;
        }
      });
    }
    for (auto& t : ts) t.join();
    CHECK_EQ(bad.load(), 0);
    env->close_file(fd);
  }
}

TEST(fault_env_fails_and_tears_requests) {
  TempDir dir;
  for (int base = 0; base < 2; ++base) {
    flexkv::FaultInjectingEnv env(base == 0 ? flexkv::make_uring_env(4) : flexkv::make_thread_env(2));
    const int fd = env.open_file(dir.path + "/fault" + std::to_string(base), 16 * kPage);
    Aligned src(8 * kPage), dst(8 * kPage);
    src.randomize(7);
    std::vector<struct iovec> wi(4), ri(4);
    std::vector<IoRequest> w(4), r(4);
    for (int i = 0; i < 4; ++i) {
      wi[i] = {src.p + 2 * i * kPage, 2 * kPage};
      ri[i] = {dst.p + 2 * i * kPage, 2 * kPage};
      w[i] = IoRequest{fd, 2 * i * kPage, &wi[i], 1, true};
      r[i] = IoRequest{fd, 2 * i * kPage, &ri[i], 1, false};
    }
    int64_t res[4];
    // After one more successful write, fail the next two.
    env.fail_writes(EIO, 1, 2);
    std::atomic<int> hook_calls{0};
    IoHooks hooks;
    hooks.complete = [&](size_t, int64_t) { ++hook_calls; };
    env.run_with_hooks(w.data(), 4, res, hooks);
    CHECK_EQ(hook_calls.load(), 4);  // failed requests complete too
    CHECK_EQ(res[0], static_cast<int64_t>(2 * kPage));
    CHECK_EQ(res[1], -EIO);
    CHECK_EQ(res[2], -EIO);
    CHECK_EQ(res[3], static_cast<int64_t>(2 * kPage));
    env.run(w.data(), 4, res);  // the rule is used up
    for (int64_t x : res) CHECK_EQ(x, static_cast<int64_t>(2 * kPage));
    env.fail_writes(ENOSPC, 0, -1);
    env.run(w.data(), 4, res);
    for (int64_t x : res) CHECK_EQ(x, -ENOSPC);
    env.run(r.data(), 4, res);  // reads are not affected
    for (int64_t x : res) CHECK_EQ(x, static_cast<int64_t>(2 * kPage));
    CHECK(std::memcmp(src.p, dst.p, src.n) == 0);
    env.fail_reads(EIO, 2, 1);
    env.run(r.data(), 4, res);
    CHECK(res[0] > 0 && res[1] > 0 && res[2] == -EIO && res[3] > 0);
    env.clear();
    // A torn write: reported whole, only its first half lands.
    Aligned fresh(8 * kPage);
    fresh.randomize(99);
    std::vector<struct iovec> ti = {{fresh.p, kPage}, {fresh.p + kPage, 3 * kPage}};
    IoRequest tw{fd, 8 * kPage, ti.data(), 2, true};
    env.tear_writes(1);
    int64_t one = 0;
    env.run(&tw, 1, &one);
    CHECK_EQ(one, static_cast<int64_t>(4 * kPage));
    struct iovec back{dst.p, 4 * kPage};
    IoRequest rb{fd, 8 * kPage, &back, 1, false};
    env.run(&rb, 1, &one);
    CHECK(std::memcmp(dst.p, fresh.p, 2 * kPage) == 0);                 // the first half is new
    CHECK(std::memcmp(dst.p + 2 * kPage, fresh.p + 2 * kPage, 2 * kPage) != 0);  // the second is not
    env.run(&tw, 1, &one);  // the tear is used up
    env.run(&rb, 1, &one);
    CHECK(std::memcmp(dst.p, fresh.p, 4 * kPage) == 0);
    env.close_file(fd);
  }
}

TEST(open_errors_name_the_path_and_the_remedy) {
  TempDir dir;
  auto env = flexkv::make_uring_env(4);
  std::string msg = open_error(*env, dir.path + "/missing/f", kPage);
  CHECK(contains(msg, dir.path + "/missing/f"));
  CHECK(contains(msg, "does not exist"));
  // fail_open reproduces the base's message for an errno.
  flexkv::FaultInjectingEnv fault(flexkv::make_thread_env(1));
  fault.fail_open(EINVAL);
  msg = open_error(fault, dir.path + "/x", kPage);
  CHECK(contains(msg, dir.path + "/x"));
  CHECK(contains(msg, "does not support O_DIRECT"));
  CHECK(contains(msg, "put ssd_cache_dir on a disk"));
  fault.fail_open(ENOSPC);
  msg = open_error(fault, dir.path + "/x", kPage);
  CHECK(contains(msg, "not enough free space"));
  fault.fail_open(EOPNOTSUPP);
  CHECK(contains(open_error(fault, dir.path + "/x", kPage), "fallocate"));
  fault.clear();
  CHECK(open_error(fault, dir.path + "/x", kPage).empty());
  // A real ENOSPC from fallocate: a file larger than /dev/shm (tmpfs refuses it up front, writing nothing).
  if (is_tmpfs("/dev/shm")) {
    const std::string huge = "/dev/shm/flexkv-test-io-enospc-" + std::to_string(::getpid());
    msg = open_error(*env, huge, uint64_t{1} << 50);
    ::unlink(huge.c_str());
    CHECK(contains(msg, huge));
    CHECK(contains(msg, "not enough free space"));
    // tmpfs has O_DIRECT since Linux 6.6; before that, open_file must say so.
    const std::string probe = "/dev/shm/flexkv-test-io-odirect-" + std::to_string(::getpid());
    msg = open_error(*env, probe, kPage);
    ::unlink(probe.c_str());
    if (!msg.empty()) {
      CHECK(contains(msg, "O_DIRECT"));
    } else {
      std::printf("  note: /dev/shm (tmpfs) supports O_DIRECT on this kernel; the O_DIRECT error is tested "
                  "through fail_open(EINVAL)\n");
    }
  }
}
TEST_MAIN()
