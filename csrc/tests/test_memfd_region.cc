#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "check.h"
#include "control/cpu_tier.h"
#include "pool/memfd_region.h"
#include "pool/region_share.h"

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string error_of(const std::string& name, const flexkv::RegionGeometry& g, double timeout_s = 5.0) {
  try {
    flexkv::map_shared_region(name, g, timeout_s);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

template <class F>
bool eventually(F done) {
  for (int i = 0; i < 200 && !done(); ++i) ::usleep(5000);
  return done();
}

// Bytes of the mapping at `p` that this process's page tables map (its Rss in /proc/self/smaps).
size_t resident_bytes(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  const auto at = reinterpret_cast<uintptr_t>(p);
  std::string line;
  bool in_it = false;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) {
      in_it = lo <= at && at < hi;
    } else if (in_it && line.compare(0, 4, "Rss:") == 0) {
      return std::stoul(line.substr(4)) * 1024;
    }
  }
  return 0;
}

flexkv::RegionGeometry geometry(size_t size) { return flexkv::RegionGeometry{size, int64_t(size / 4096), 4096, 4000}; }

}  // namespace

TEST(created_memory_is_shared_through_the_socket) {
  auto owner = flexkv::MemfdRegion::create("flexkv-test", 1 << 20, false);
  CHECK(owner.fd() >= 0 && owner.size() == size_t{1} << 20);
  std::memset(owner.data(), 0x5a, owner.size());
  flexkv::RegionServer server(owner.fd(), geometry(owner.size()), "flexkv-test");
  CHECK(server.name().compare(0, 13, "@flexkv-test-") == 0 && contains(server.name(), std::to_string(::getpid())));
  auto mapped = flexkv::map_shared_region(server.name(), geometry(owner.size()), 5.0);
  CHECK(mapped.data() != owner.data() && mapped.size() == owner.size());
  CHECK_EQ(mapped.data()[12345], 0x5a);
  mapped.data()[7] = 0x11;  // the same pages, not a copy
  CHECK_EQ(owner.data()[7], 0x11);
  CHECK_EQ(mapped.fd(), -1);  // the mapper keeps the mapping only
  CHECK(eventually([&] { return server.served() == 1; }));  // counted just after the send
}

TEST(announced_geometry_must_match_what_the_mapper_was_told) {
  auto owner = flexkv::MemfdRegion::create("flexkv-test", 1 << 20, false);
  flexkv::RegionServer server(owner.fd(), geometry(owner.size()), "flexkv-test");
  flexkv::RegionGeometry other = geometry(owner.size());
  other.block_bytes = 4096;
  const std::string msg = error_of(server.name(), other);
  CHECK(contains(msg, "block_bytes=4000") && contains(msg, "another cache"));
}

TEST(peer_of_another_uid_is_refused) {
  // The owner's uid is injected: this process then is "another user", and gets no descriptor.
  auto owner = flexkv::MemfdRegion::create("flexkv-test", 1 << 16, false);
  flexkv::RegionServer server(owner.fd(), geometry(owner.size()), "flexkv-test", ::geteuid() + 1);
  const std::string msg = error_of(server.name(), geometry(owner.size()));
  CHECK(contains(msg, "refused") && contains(msg, "uid " + std::to_string(::geteuid())));
  CHECK(eventually([&] { return server.refused() == 1; }));
  CHECK_EQ(server.served(), 0u);
}

TEST(silent_peer_blocks_neither_other_peers_nor_stop) {
  auto owner = flexkv::MemfdRegion::create("flexkv-test", 1 << 16, false);
  auto server = std::make_unique<flexkv::RegionServer>(owner.fd(), geometry(owner.size()), "flexkv-test");
  // A peer that connects and never reads.
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path + 1, server->name().data() + 1, server->name().size() - 1);
  const int silent = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(::connect(silent, reinterpret_cast<sockaddr*>(&addr),
                  static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + server->name().size())) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  auto mapped = flexkv::map_shared_region(server->name(), geometry(owner.size()), 5.0);
  const std::string name = server->name();
  server->stop();
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(2));
  CHECK(mapped.size() == owner.size());
  ::close(silent);
  // Once the owner stops, its name is gone: nothing answers there.
  CHECK(contains(error_of(name, geometry(owner.size())), "nothing listens"));
  server.reset();
}

TEST(cpu_tier_hands_out_its_blocks_and_stops_on_close) {
  flexkv::CpuTier tier(8, 3000, 4096, 0.0, false);
  const flexkv::TierInfo info = tier.info();
  CHECK(info.socket.compare(0, 12, "@flexkv-cpu-") == 0);
  CHECK(info.num_blocks == 8 && info.block_stride == 4096 && info.block_bytes == 3000 && info.size == 8 * 4096);
  std::memset(tier.block(3), 0x33, 3000);
  auto mapped = flexkv::map_shared_region(info.socket, info.geometry(), 5.0);
  CHECK(mapped.data() == tier.block(0));  // in the owner's process: the owner's mapping, not a second one
  CHECK_EQ(mapped.data()[3 * 4096 + 2999], 0x33);
  flexkv::TierInfo other = info;
  other.num_blocks = 9;
  CHECK(contains(error_of(info.socket, other.geometry()), "another cache"));  // checked there too
  tier.close();
  CHECK_EQ(mapped.data()[3 * 4096], 0x33);  // a mapper's pages outlive the owner's hold
  CHECK(contains(error_of(info.socket, info.geometry()), "nothing listens"));
  tier.close();  // idempotent
}

TEST(prefault_maps_every_page_and_keeps_the_contents) {
  constexpr size_t kBytes = size_t{8} << 20;
  auto owner = flexkv::MemfdRegion::create("flexkv-test", kBytes, false);
  owner.data()[0] = 0x42;
  owner.data()[kBytes - 1] = 0x24;
  auto mapped = flexkv::MemfdRegion::map(owner.fd(), kBytes);
  CHECK_EQ(resident_bytes(mapped.data()), 0u);  // nothing touched through this mapping yet
  mapped.prefault_in_background();
  bool all = false;
  for (int i = 0; i < 2000 && !all; ++i, ::usleep(5000)) all = resident_bytes(mapped.data()) == kBytes;
  CHECK(all);
  CHECK(mapped.data()[0] == 0x42 && mapped.data()[kBytes - 1] == 0x24 && mapped.data()[kBytes / 2] == 0);
  mapped.close();  // while or after the thread runs: it lets go of the mapping
  owner.prefault_in_background();
  owner.close();
}

TEST(huge_pages_fall_back_to_ordinary_pages_with_a_note) {
  // Hugetlb pages when the machine has them free, else ordinary pages and a note saying why.
  std::string note;
  auto r = flexkv::MemfdRegion::create("flexkv-test", 3 << 20, true, &note);
  CHECK(r.data() != nullptr && r.size() >= size_t{3} << 20);
  CHECK(r.hugetlb() ? note.empty() && r.size() % (2 << 20) == 0 : contains(note, "huge pages"));
  r.data()[r.size() - 1] = 1;
}

TEST(too_much_memory_is_refused_up_front) {
  const auto room = flexkv::host_memory_room();
  CHECK(room.has_value());
  if (room) {
    try {
      flexkv::CpuTier tier(2, *room, 1, 0.0, false);
      CHECK(false && "a tier larger than the memory was created");
    } catch (const std::exception& e) {
      const std::string msg = e.what();
      CHECK(contains(msg, "num_cpu_blocks") && contains(msg, "cpu_cache_gb") && contains(msg, "MemAvailable"));
    }
  }
  CHECK_THROWS(flexkv::MemfdRegion::create("flexkv-test", 0, false));
  CHECK_THROWS(flexkv::map_shared_region("no-at-sign", geometry(4096), 1.0));
}

TEST_MAIN()
