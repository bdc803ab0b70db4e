#include <set>
#include <vector>

#include "check.h"
#include "pool/block_pool.h"

TEST(allocates_every_id_once) {
  flexkv::BlockPool pool(10);
  std::vector<int32_t> ids(12);
  CHECK_EQ(pool.allocate(12, ids.data()), 10u);
  std::set<int32_t> s(ids.begin(), ids.begin() + 10);
  CHECK_EQ(s.size(), 10u);
  CHECK_EQ(*s.begin(), 0);
  CHECK_EQ(*s.rbegin(), 9);
  CHECK_EQ(pool.num_free(), 0u);
}

TEST(free_returns_ids_and_rejects_double_free) {
  flexkv::BlockPool pool(4);
  std::vector<int32_t> ids(4);
  pool.allocate(4, ids.data());
  pool.free(ids.data(), 2);
  CHECK_EQ(pool.num_free(), 2u);
  CHECK_THROWS(pool.free(ids.data(), 1));
  int32_t bad = 7;
  CHECK_THROWS(pool.free(&bad, 1));
  CHECK_EQ(pool.num_free(), 2u);
}

TEST_MAIN()
