// SsdStore under faults: I/O errors and torn writes through the fault env, and directories it cannot use
// (missing, not writable, full, no O_DIRECT) refused naming the directory and the remedy.
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>

#include "ssd_store_harness.h"

TEST(io_errors_and_torn_writes_through_the_fault_env) {
  for (int kind = 0; kind < 2; ++kind) {
    TempDir dir;
    const uint64_t bytes = 64 << 10;
    auto fault = std::make_shared<flexkv::FaultInjectingEnv>(kind == 0 ? flexkv::make_uring_env(16)
                                                                       : flexkv::make_thread_env(2));
    SsdStore store(options({dir.path}, 32, bytes, 16), fault);
    CHECK_EQ(store.io_env_name(), kind == 0 ? "fault(io_uring)" : "fault(threads)");
    Blocks b(8, bytes, 16, 41);
    Buffer out(8, bytes);
    std::vector<SsdBlock> w, r;
    for (size_t i = 0; i < 8; ++i) {  // scattered: one request per block
      w.push_back(b.at(i, static_cast<int32_t>(3 * i)));
      r.push_back(b.at(i, static_cast<int32_t>(3 * i), out.at(i)));
    }
    fault->fail_writes(EIO, 2, 3);
    std::vector<SsdStatus> st = write_blocks(store, w);
    CHECK(st[0] == SsdStatus::kOk && st[1] == SsdStatus::kOk);
    for (size_t i = 2; i < 5; ++i) CHECK(st[i] == SsdStatus::kIoError);
    CHECK(st[5] == SsdStatus::kOk);
    st = read_blocks(store, r);
    CHECK(st[0] == SsdStatus::kOk && st[2] == SsdStatus::kMismatch && st[7] == SsdStatus::kOk);
    fault->fail_writes(ENOSPC, 0, -1);
    CHECK(all(write_blocks(store, w), SsdStatus::kIoError));
    fault->clear();
    CHECK(all(write_blocks(store, w), SsdStatus::kOk));
    fault->fail_reads(EIO, 0, -1);
    CHECK(all(read_blocks(store, r), SsdStatus::kIoError));
    fault->clear();
    CHECK(all(read_blocks(store, r), SsdStatus::kOk));
    // Torn writes of other blocks over the same slots: reported ok, read back as a mismatch, never kOk.
    Blocks nb(8, bytes, 16, 42);
    std::vector<SsdBlock> w2, r2;
    for (size_t i = 0; i < 8; ++i) {
      w2.push_back(nb.at(i, static_cast<int32_t>(3 * i)));
      r2.push_back(nb.at(i, static_cast<int32_t>(3 * i), out.at(i)));
    }
    fault->tear_writes(4);
    CHECK(all(write_blocks(store, w2), SsdStatus::kOk));
    st = read_blocks(store, r2);
    size_t torn = 0;
    for (SsdStatus s : st) torn += s == SsdStatus::kMismatch;
    CHECK_EQ(torn, 4u);
    for (SsdStatus s : st) CHECK(s != SsdStatus::kIoError);
    // The old blocks are gone from the torn slots as well (payload half new, half old).
    st = read_blocks(store, r);
    for (SsdStatus s : st) CHECK(s == SsdStatus::kMismatch);
    // A torn run of neighbours: the blocks in its first half land, the rest do not.
    std::vector<SsdBlock> run, runr;
    for (size_t i = 0; i < 8; ++i) {
      run.push_back(b.at(i, static_cast<int32_t>(24 + i)));
      runr.push_back(b.at(i, static_cast<int32_t>(24 + i), out.at(i)));
    }
    fault->tear_writes(1);
    CHECK(all(write_blocks(store, run), SsdStatus::kOk));
    st = read_blocks(store, runr);
    for (size_t i = 0; i < 4; ++i) CHECK(st[i] == SsdStatus::kOk);
    for (size_t i = 4; i < 8; ++i) CHECK(st[i] == SsdStatus::kMismatch);
  }
}

TEST(constructor_errors_name_the_directory_and_the_remedy) {
  TempDir dir;
  auto env = env_of(0);
  // Impossible options.
  CHECK_THROWS(SsdStore(options({}, 8, 4096, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 0, 4096, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 0, 16), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 0), env));
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 16, "fp", 4096), env));  // smaller than a slot
  const std::vector<std::string> twice = {dir.path, dir.path + "/"};
  CHECK_THROWS(SsdStore(options(twice, 8, 4096, 16), env));  // the same dir twice
  CHECK_THROWS(SsdStore(options({dir.path}, 8, 4096, 16), nullptr));

  // A missing directory whose parent cannot be created: a regular file where a directory should be.
  const std::string file = dir.path + "/a-file";
  ::close(::open(file.c_str(), O_CREAT | O_WRONLY, 0644));
  std::string msg = error_of([&] { SsdStore s(options({file + "/sub/dir"}, 8, 4096, 16), env); });
  CHECK(contains(msg, file + "/sub/dir"));
  CHECK(contains(msg, "does not exist and cannot be created"));
  CHECK(contains(msg, "ssd_cache_dir"));
  msg = error_of([&] { SsdStore s(options({"/proc/flexkv-no-such-dir/x"}, 8, 4096, 16), env); });
  CHECK(contains(msg, "/proc/flexkv-no-such-dir/x"));
  CHECK(contains(msg, "cannot be created"));
  // A path that is a file.
  msg = error_of([&] { SsdStore s(options({file}, 8, 4096, 16), env); });
  CHECK(contains(msg, file));

  // A directory that cannot be written. chmod 0555 does not stop root (the tests run as root here), so
  // make it immutable (chattr +i) instead; where neither works, this one check is skipped.
  const std::string ro = dir.path + "/read-only";
  ::mkdir(ro.c_str(), 0755);
  bool made_ro = false;
  bool immutable = false;
  if (::geteuid() != 0) {
    made_ro = ::chmod(ro.c_str(), 0555) == 0;
  } else {
    int fd = ::open(ro.c_str(), O_RDONLY | O_DIRECTORY);
    int flags = 0;
    if (fd >= 0 && ::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
      flags |= FS_IMMUTABLE_FL;
      immutable = made_ro = ::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
    }
    if (fd >= 0) ::close(fd);
  }
  if (made_ro) {
    msg = error_of([&] { SsdStore s(options({ro}, 8, 4096, 16), env); });
    CHECK(contains(msg, ro));
    CHECK(contains(msg, "not writable"));
    CHECK(contains(msg, "ssd_cache_dir"));
    if (immutable) {
      int fd = ::open(ro.c_str(), O_RDONLY | O_DIRECTORY);
      int flags = 0;
      ::ioctl(fd, FS_IOC_GETFLAGS, &flags);
      flags &= ~FS_IMMUTABLE_FL;
      ::ioctl(fd, FS_IOC_SETFLAGS, &flags);
      ::close(fd);
    }
  } else {
    std::printf("  note: cannot make a read-only directory here; the not-writable check is skipped\n");
  }

  // Not enough space: refused before anything is allocated.
  msg = error_of([&] { SsdStore s(options({dir.path + "/big"}, 1 << 20, uint64_t{1} << 30, 16), env); });
  CHECK(contains(msg, dir.path + "/big"));
  CHECK(contains(msg, "not enough free space"));
  CHECK(contains(msg, "num_ssd_blocks"));

  // No O_DIRECT: tmpfs before Linux 6.6 (here through the fault env's fail_open, which throws what the
  // base env throws for EINVAL from open(O_DIRECT)).
  auto fault = std::make_shared<flexkv::FaultInjectingEnv>(flexkv::make_uring_env(4));
  fault->fail_open(EINVAL);
  msg = error_of([&] { SsdStore s(options({dir.path + "/nod"}, 8, 4096, 16), fault); });
  CHECK(contains(msg, dir.path + "/nod"));
  CHECK(contains(msg, "does not support O_DIRECT"));
  CHECK(contains(msg, "put ssd_cache_dir on a disk"));
  // And on a real tmpfs: an error that names O_DIRECT where tmpfs lacks it, a working store where it has it.
  struct statfs sfs;
  if (::statfs("/dev/shm", &sfs) == 0 && sfs.f_type == 0x01021994) {
    const std::string shm = "/dev/shm/flexkv-test-ssd-" + std::to_string(::getpid());
    msg = error_of([&] {
      SsdStore s(options({shm}, 4, 4096, 16), env);
      Blocks b(1, 4096, 16, 1);
      CHECK(all(write_blocks(s, {b.at(0, 0)}), SsdStatus::kOk));
    });
    if (!msg.empty()) {
      CHECK(contains(msg, "O_DIRECT"));
      CHECK(contains(msg, shm));
    } else {
      std::printf("  note: /dev/shm (tmpfs) supports O_DIRECT on this kernel (Linux >= 6.6)\n");
    }
    ::nftw(shm.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
}

TEST_MAIN()
