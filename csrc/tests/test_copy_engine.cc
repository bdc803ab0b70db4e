// The CopyEngine contract on the host copy engine (engine memory in host RAM).
#include <cstdlib>
#include <cstring>

#include "copy_engine_contract.h"

namespace contract {

namespace {
struct HostMemory : EngineMemory {
  uint8_t* alloc(size_t bytes) override { return static_cast<uint8_t*>(std::malloc(bytes)); }
  void release(uint8_t* p) override { std::free(p); }
  void write(uint8_t* dst, const uint8_t* src, size_t n) override { std::memcpy(dst, src, n); }
  void read(uint8_t* dst, const uint8_t* src, size_t n) override { std::memcpy(dst, src, n); }
};
}  // namespace

std::unique_ptr<CopyEngine> make_engine(int threads) { return flexkv::make_host_copy_engine(threads); }

EngineMemory& engine_memory() {
  static HostMemory m;
  return m;
}

}  // namespace contract

TEST(host_engine_has_no_streams) {
  auto e = contract::make_engine(1);
  CHECK(e->name() == "host");
  CHECK_EQ(e->device(), -1);
  CHECK(e->stream(flexkv::CopyDirection::kHostToEngine) == nullptr);
  CHECK_THROWS(e->stream_wait_group(1, 0, nullptr));
}

TEST_MAIN()
