#include <unistd.h>

#include <cstring>
#include <string>

#include "check.h"
#include "pool/shm_region.h"

TEST(create_open_share_bytes_and_unlink) {
  const std::string name = "/flexkv-test-" + std::to_string(::getpid());
  {
    auto a = flexkv::ShmRegion::create(name, 1 << 20, false);
    std::memset(a.data(), 0x5a, a.size());
    auto b = flexkv::ShmRegion::open(name);
    CHECK_EQ(b.size(), size_t{1} << 20);
    CHECK_EQ(b.data()[12345], 0x5a);
    CHECK_THROWS(flexkv::ShmRegion::create(name, 4096, false));  // name taken
  }
  CHECK_THROWS(flexkv::ShmRegion::open(name));  // the owner removed it
}

TEST(rejects_bad_names_and_sizes) {
  CHECK_THROWS(flexkv::ShmRegion::create("no-slash", 4096, false));
  CHECK_THROWS(flexkv::ShmRegion::create("/flexkv-empty", 0, false));
}

TEST_MAIN()
