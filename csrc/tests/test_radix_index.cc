#include <algorithm>
#include <map>
#include <random>
#include <vector>

#include "check.h"
#include "index/block_key.h"
#include "index/radix_index.h"

using flexkv::BlockKey;
using flexkv::RadixIndex;

namespace {

std::vector<BlockKey> keys_for(const std::vector<int64_t>& tokens, size_t tpb = 4) {
  std::vector<BlockKey> k(tokens.size() / tpb);
  flexkv::chain_block_keys(flexkv::namespace_key("test"), tokens.data(), tokens.size(), tpb, k.data());
  return k;
}

std::vector<int64_t> seq(int64_t start, size_t n) {
  std::vector<int64_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = start + static_cast<int64_t>(i);
  return t;
}

// Reserves and commits the whole chain; returns the ids.
std::vector<int32_t> store(RadixIndex& idx, const std::vector<BlockKey>& k) {
  std::vector<int32_t> ids(k.size());
  std::vector<uint8_t> fresh(k.size());
  size_t got = idx.reserve(k.data(), k.size(), 0, ids.data(), fresh.data());
  std::vector<int32_t> new_ids;
  for (size_t i = 0; i < got; ++i)
    if (fresh[i]) new_ids.push_back(ids[i]);
  idx.commit(new_ids.data(), new_ids.size());
  ids.resize(got);
  return ids;
}

}  // namespace

TEST(store_then_match_prefixes) {
  RadixIndex idx(64, 0.0);
  auto k = keys_for(seq(0, 32));  // 8 blocks
  CHECK_EQ(idx.match(k.data(), k.size()), 0u);
  store(idx, k);
  CHECK_EQ(idx.match(k.data(), k.size()), 8u);
  CHECK_EQ(idx.match(k.data(), 3), 3u);
  auto other = seq(0, 32);
  other[13] = 999;  // diverges inside block 3
  auto ko = keys_for(other);
  CHECK_EQ(idx.match(ko.data(), ko.size()), 3u);
  idx.check_consistency();
}

TEST(divergent_store_splits_and_shares_prefix) {
  RadixIndex idx(64, 0.0);
  auto a = seq(0, 32);
  auto b = a;
  b[17] = 555;  // block 4 differs
  auto ka = keys_for(a), kb = keys_for(b);
  auto ida = store(idx, ka);
  std::vector<int32_t> idb(kb.size());
  std::vector<uint8_t> fresh(kb.size());
  CHECK_EQ(idx.reserve(kb.data(), kb.size(), 0, idb.data(), fresh.data()), 8u);
  for (int i = 0; i < 4; ++i) {
    CHECK_EQ(fresh[i], 0);
    CHECK_EQ(idb[i], ida[i]);
  }
  for (int i = 4; i < 8; ++i) CHECK_EQ(fresh[i], 1);
  CHECK_EQ(idx.match(kb.data(), kb.size()), 4u);  // new blocks are not ready yet
  idx.commit(idb.data() + 4, 4);
  CHECK_EQ(idx.match(kb.data(), kb.size()), 8u);
  CHECK_EQ(idx.match(ka.data(), ka.size()), 8u);
  CHECK_EQ(idx.stats().num_cached, 12);
  idx.check_consistency();
}

TEST(unready_blocks_of_a_failed_store_are_rewritten) {
  RadixIndex idx(16, 0.0);
  auto k = keys_for(seq(0, 16));
  std::vector<int32_t> ids(4);
  std::vector<uint8_t> fresh(4);
  idx.reserve(k.data(), 4, 0, ids.data(), fresh.data());
  // A second store while the first is in flight writes nothing new.
  std::vector<int32_t> ids2(4);
  std::vector<uint8_t> fresh2(4);
  CHECK_EQ(idx.reserve(k.data(), 4, 0, ids2.data(), fresh2.data()), 4u);
  for (int i = 0; i < 4; ++i) CHECK_EQ(fresh2[i], 0);
  idx.release(ids.data(), 4);  // the first store failed
  CHECK_EQ(idx.match(k.data(), 4), 0u);
  CHECK_EQ(idx.reserve(k.data(), 4, 0, ids2.data(), fresh2.data()), 4u);
  for (int i = 0; i < 4; ++i) {
    CHECK_EQ(fresh2[i], 1);
    CHECK_EQ(ids2[i], ids[i]);
  }
  idx.commit(ids2.data(), 4);
  CHECK_EQ(idx.match(k.data(), 4), 4u);
  idx.check_consistency();
}

TEST(eviction_is_lru_and_frees_extra) {
  RadixIndex idx(8, 0.25);  // extra = 2 blocks
  auto a = keys_for(seq(0, 16));      // 4 blocks
  auto b = keys_for(seq(1000, 16));   // 4 blocks
  store(idx, a);
  store(idx, b);
  std::vector<int32_t> tmp(4);
  idx.release(tmp.data(), idx.acquire(a.data(), 4, 0, tmp.data()));  // a is now more recent than b
  auto c = keys_for(seq(2000, 8));    // 2 blocks: needs 2, evicts 2 + 2 extra from b
  auto idc = store(idx, c);
  CHECK_EQ(idc.size(), 2u);
  CHECK_EQ(idx.match(a.data(), 4), 4u);
  CHECK_EQ(idx.match(b.data(), 4), 0u);  // b's whole chain went, tail first
  CHECK_EQ(idx.stats().evicted, 4);
  idx.check_consistency();
}

TEST(locked_blocks_are_never_evicted) {
  RadixIndex idx(8, 0.0);
  auto a = keys_for(seq(0, 32));  // 8 blocks fill the pool
  store(idx, a);
  std::vector<int32_t> held(8);
  CHECK_EQ(idx.acquire(a.data(), 8, 0, held.data()), 8u);
  auto b = keys_for(seq(500, 8));
  std::vector<int32_t> ids(2);
  std::vector<uint8_t> fresh(2);
  CHECK_EQ(idx.reserve(b.data(), 2, 0, ids.data(), fresh.data()), 0u);  // nothing evictable
  CHECK_EQ(idx.match(a.data(), 8), 8u);
  idx.release(held.data() + 6, 2);  // unlock the last two blocks only
  CHECK_EQ(idx.reserve(b.data(), 2, 0, ids.data(), fresh.data()), 2u);
  CHECK_EQ(idx.match(a.data(), 8), 6u);
  idx.release(held.data(), 6);
  idx.check_consistency();
}

TEST(store_never_evicts_its_own_prefix) {
  RadixIndex idx(6, 0.0);
  auto a = keys_for(seq(0, 24));  // 6 blocks fill the pool
  store(idx, a);
  auto longer = keys_for(seq(0, 32));  // same 6 blocks + 2 more
  std::vector<int32_t> ids(8);
  std::vector<uint8_t> fresh(8);
  // Only a's own tail could be evicted; the store must not eat its own prefix.
  size_t got = idx.reserve(longer.data(), 8, 0, ids.data(), fresh.data());
  CHECK_EQ(got, 6u);
  CHECK_EQ(idx.match(a.data(), 6), 6u);
  idx.check_consistency();
}

TEST(release_and_commit_reject_bad_ids_atomically) {
  RadixIndex idx(8, 0.0);
  auto a = keys_for(seq(0, 8));
  std::vector<int32_t> ids(2);
  std::vector<uint8_t> fresh(2);
  idx.reserve(a.data(), 2, 0, ids.data(), fresh.data());
  std::vector<int32_t> bad{ids[0], 42};
  CHECK_THROWS(idx.release(bad.data(), 2));
  CHECK_EQ(idx.lock_count(ids[0]), 1);  // unchanged
  std::vector<int32_t> twice{ids[0], ids[0]};
  CHECK_THROWS(idx.release(twice.data(), 2));
  CHECK_EQ(idx.lock_count(ids[0]), 1);
  CHECK_THROWS(idx.reset());  // locked blocks
  CHECK_THROWS(idx.commit(twice.data(), 2));  // listed twice, locked once
  CHECK_EQ(idx.lock_count(ids[0]), 1);
  idx.check_consistency();
  idx.commit(ids.data(), 2);
  CHECK_THROWS(idx.commit(ids.data(), 1));  // not locked any more
  idx.reset();
  CHECK_EQ(idx.match(a.data(), 2), 0u);
  CHECK_EQ(idx.stats().num_free, 8);
  idx.check_consistency();
}

TEST(a_store_after_the_mask_needs_its_prefix_cached) {
  RadixIndex idx(10, 0.0);
  auto a = keys_for(seq(0, 32));  // 8 of the 10 blocks
  store(idx, a);
  auto b = keys_for(seq(900, 32));
  std::vector<int32_t> ids(8);
  std::vector<uint8_t> fresh(8);
  // b's blocks 0..5 are not cached: a store of blocks 6..7 has nothing to hang them off.
  CHECK_EQ(idx.reserve(b.data(), 8, 6, ids.data(), fresh.data()), 0u);
  CHECK_EQ(idx.match(a.data(), 8), 8u);  // nothing was evicted for it
  CHECK_EQ(idx.stats().evicted, 0);
  // With the prefix cached, only the tail is new.
  auto longer = keys_for(seq(0, 40));
  std::vector<int32_t> ids2(10);
  std::vector<uint8_t> fresh2(10);
  std::vector<int32_t> held(8);
  CHECK_EQ(idx.acquire(a.data(), 8, 6, held.data()), 8u);  // locks blocks 6 and 7 only
  CHECK_EQ(idx.lock_count(held[0]), 1);
  idx.release(held.data(), 2);
  CHECK_EQ(idx.reserve(longer.data(), 10, 8, ids2.data(), fresh2.data()), 10u);
  for (int i = 0; i < 8; ++i) CHECK_EQ(fresh2[i], 0);
  CHECK_EQ(fresh2[8], 1);
  CHECK_EQ(fresh2[9], 1);
  idx.commit(ids2.data() + 8, 2);
  idx.check_consistency();
}

TEST(a_split_is_undone_by_nothing_when_no_block_can_be_had) {
  RadixIndex idx(4, 0.0);
  auto a = keys_for(seq(0, 16));
  store(idx, a);
  std::vector<int32_t> held(4);
  idx.acquire(a.data(), 4, 0, held.data());  // everything locked
  auto b = seq(0, 16);
  b[9] = 77;  // diverges in block 2
  auto kb = keys_for(b);
  std::vector<int32_t> ids(4);
  std::vector<uint8_t> fresh(4);
  CHECK_EQ(idx.reserve(kb.data(), 4, 0, ids.data(), fresh.data()), 2u);
  CHECK_EQ(idx.stats().num_nodes, 1);  // no split left behind
  idx.release(held.data(), 4);
  idx.check_consistency();
}

TEST(restore_rebuilds_chains_and_leaves_out_orphans) {
  // Three sequences: a, b sharing a's first 3 blocks, c alone. Entries come in scrambled order.
  auto ta = seq(0, 24);
  auto tb = ta;
  tb[13] = 999;  // diverges in block 3
  auto tc = seq(5000, 8);
  auto ka = keys_for(ta), kb = keys_for(tb), kc = keys_for(tc);
  const BlockKey seed = flexkv::namespace_key("test");
  std::vector<BlockKey> keys, parents;
  std::vector<int64_t> pos;
  std::vector<int32_t> ids;
  auto add = [&](const std::vector<BlockKey>& k, size_t i, int32_t id) {
    keys.push_back(k[i]);
    parents.push_back(i == 0 ? seed : k[i - 1]);
    pos.push_back(static_cast<int64_t>(i));
    ids.push_back(id);
  };
  for (size_t i = 6; i-- > 0;) add(ka, i, static_cast<int32_t>(10 + i));
  for (size_t i = 3; i < 6; ++i) add(kb, i, static_cast<int32_t>(20 + i));
  add(kc, 1, 30);       // orphan: c's block 0 is missing
  add(ka, 2, 40);       // a repeated key
  add(kc, 0, 99);       // id out of range: left out, and so is nothing else of c (its block 1 is an orphan)
  RadixIndex idx(64, 0.0);
  std::vector<int32_t> left;
  CHECK_EQ(idx.restore(keys.data(), parents.data(), pos.data(), ids.data(), keys.size(), &left), 9u);
  CHECK_EQ(idx.match(ka.data(), 6), 6u);
  CHECK_EQ(idx.match(kb.data(), 6), 6u);
  CHECK_EQ(idx.match(kc.data(), 2), 0u);
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<int32_t>({30, 40}));
  std::vector<int32_t> got(6);
  CHECK_EQ(idx.acquire(kb.data(), 6, 0, got.data()), 6u);
  CHECK(got == std::vector<int32_t>({10, 11, 12, 23, 24, 25}));
  idx.release(got.data(), 6);
  CHECK_EQ(idx.stats().num_free, 64 - 9);
  idx.check_consistency();
  // New blocks never take a restored id.
  auto kd = keys_for(seq(7000, 4));
  std::vector<int32_t> nid(1);
  std::vector<uint8_t> fresh(1);
  idx.reserve(kd.data(), 1, 0, nid.data(), fresh.data());
  CHECK(nid[0] < 10 || nid[0] > 25);
  idx.commit(nid.data(), 1);
  CHECK_THROWS(idx.restore(keys.data(), parents.data(), pos.data(), ids.data(), keys.size(), &left));
}

TEST(set_ready_marks_locked_blocks_only) {
  RadixIndex idx(8, 0.0);
  auto k = keys_for(seq(0, 12));
  std::vector<int32_t> ids(3);
  std::vector<uint8_t> fresh(3);
  idx.reserve(k.data(), 3, 0, ids.data(), fresh.data());
  idx.set_ready(ids.data(), 2, true);  // promoted, still held by a load
  CHECK_EQ(idx.match(k.data(), 3), 2u);
  CHECK_EQ(idx.lock_count(ids[0]), 1);
  idx.set_ready(ids.data() + 1, 1, false);  // found corrupt
  CHECK_EQ(idx.match(k.data(), 3), 1u);
  idx.release(ids.data(), 3);
  CHECK_THROWS(idx.set_ready(ids.data(), 1, true));  // no longer locked
  std::vector<int32_t> again(3);
  std::vector<uint8_t> fresh2(3);
  CHECK_EQ(idx.reserve(k.data(), 3, 0, again.data(), fresh2.data()), 3u);
  CHECK(fresh2[0] == 0 && fresh2[1] == 1 && fresh2[2] == 1);  // the unready ones are rewritten
  idx.commit(again.data() + 1, 2);
  idx.check_consistency();
}

TEST(random_operations_keep_invariants) {
  std::mt19937 rng(1234);
  RadixIndex idx(200, 0.05);
  // A few shared prefixes with random continuations, like multi-turn chats.
  std::vector<std::vector<int64_t>> prompts;
  for (int p = 0; p < 60; ++p) {
    std::vector<int64_t> t = seq((p % 5) * 100000, 4 * (rng() % 10));
    const size_t extra = 4 * (1 + rng() % 20);
    for (size_t i = 0; i < extra; ++i) t.push_back(static_cast<int64_t>(rng() % 50));
    prompts.push_back(t);
  }
  std::vector<std::vector<int32_t>> held;  // acquired, not yet released
  std::vector<std::vector<int32_t>> writing;
  for (int step = 0; step < 4000; ++step) {
    const auto& t = prompts[rng() % prompts.size()];
    auto k = keys_for(t);
    switch (rng() % 5) {
      case 0: {
        std::vector<int32_t> ids(k.size());
        ids.resize(idx.acquire(k.data(), k.size(), 0, ids.data()));
        for (int32_t id : ids) CHECK(idx.is_ready(id));
        held.push_back(ids);
        break;
      }
      case 1: {
        std::vector<int32_t> ids(k.size());
        std::vector<uint8_t> fresh(k.size());
        size_t got = idx.reserve(k.data(), k.size(), 0, ids.data(), fresh.data());
        std::vector<int32_t> mine;
        for (size_t i = 0; i < got; ++i)
          if (fresh[i]) mine.push_back(ids[i]);
        writing.push_back(mine);
        break;
      }
      case 2:
        if (!writing.empty()) {
          auto w = writing.back();
          writing.pop_back();
          if (rng() % 4 == 0) idx.release(w.data(), w.size()); else idx.commit(w.data(), w.size());
        }
        break;
      case 3:
        if (!held.empty()) {
          const size_t pick = rng() % held.size();
          idx.release(held[pick].data(), held[pick].size());
          held.erase(held.begin() + static_cast<std::ptrdiff_t>(pick));
        }
        break;
      default:
        idx.evict(1 + rng() % 20);
        break;
    }
    // Every held block is still ready and mapped: eviction skipped it.
    for (const auto& h : held)
      for (int32_t id : h) CHECK(idx.is_ready(id) && idx.lock_count(id) > 0);
    if (step % 50 == 0) idx.check_consistency();
  }
  for (auto& h : held) idx.release(h.data(), h.size());
  for (auto& w : writing) idx.commit(w.data(), w.size());
  idx.check_consistency();
  CHECK_EQ(idx.stats().num_locked, 0);
}

TEST(entries_are_independent_one_block_chains) {
  RadixIndex idx(4, 0.0);
  std::vector<BlockKey> k = {flexkv::namespace_key("p0"), flexkv::namespace_key("p1"), flexkv::namespace_key("p2"),
                             flexkv::namespace_key("p3"), flexkv::namespace_key("p4")};
  std::vector<int32_t> ids(5);
  std::vector<uint8_t> fresh(5), ready(5);
  // Entries 1 and 3 only: each stands alone, whatever else is stored.
  std::vector<BlockKey> some = {k[1], k[3]};
  CHECK_EQ(idx.reserve_each(some.data(), 2, ids.data(), fresh.data()), 2u);
  CHECK(fresh[0] && fresh[1]);
  idx.commit(ids.data(), 2);
  idx.contains_each(k.data(), 5, ready.data());
  CHECK(!ready[0] && ready[1] && !ready[2] && ready[3] && !ready[4]);
  CHECK_EQ(idx.acquire_each(k.data() + 1, 1, ids.data()), 1u);
  CHECK_EQ(idx.lock_count(ids[0]), 1);
  idx.release(ids.data(), 1);
  CHECK_EQ(idx.acquire_each(k.data(), 5, ids.data()), 0u);  // leading entries only
  // A full pool evicts the least recently used entry; locked entries stay.
  std::vector<BlockKey> three = {k[0], k[2], k[4]};
  CHECK_EQ(idx.acquire_each(k.data() + 3, 1, ids.data()), 1u);
  const int32_t held = ids[0];
  // Two free blocks, then k[1] is evicted for the third; k[3] is held.
  CHECK_EQ(idx.reserve_each(three.data(), 3, ids.data(), fresh.data()), 3u);
  idx.commit(ids.data(), 3);
  idx.release(&held, 1);
  idx.contains_each(k.data(), 5, ready.data());
  CHECK(ready[0] && !ready[1] && ready[2] && ready[3] && ready[4]);
  // Nothing can be had while every block is locked: reserve_each stops.
  std::vector<int32_t> all(4);
  std::vector<BlockKey> held_keys = {k[0], k[2], k[3], k[4]};
  CHECK_EQ(idx.acquire_each(held_keys.data(), 4, all.data()), 4u);
  CHECK_EQ(idx.reserve_each(k.data() + 1, 1, ids.data(), fresh.data()), 0u);
  idx.release(all.data(), 4);
  idx.check_consistency();
}

namespace {

struct Recorder : flexkv::IndexListener {
  std::vector<BlockKey> removed;
  int cleared = 0;
  void on_removed(const BlockKey* keys, size_t n) override { removed.insert(removed.end(), keys, keys + n); }
  void on_cleared() override { ++cleared; }
};

}  // namespace

TEST(chains_continue_from_a_parent_key) {
  RadixIndex idx(64, 0.0);
  auto k = keys_for(seq(0, 40));  // 10 blocks
  store(idx, std::vector<BlockKey>(k.begin(), k.begin() + 4));
  // The next 6 blocks hang off block 3, given by its key alone.
  std::vector<int32_t> ids(6);
  std::vector<uint8_t> fresh(6);
  CHECK_EQ(idx.reserve(k.data() + 4, 6, 0, ids.data(), fresh.data(), &k[3]), 6u);
  idx.commit(ids.data(), 6);
  CHECK_EQ(idx.match(k.data(), k.size()), 10u);              // one chain from the root
  CHECK_EQ(idx.match(k.data() + 6, 4, &k[5]), 4u);          // and from any block of it
  CHECK_EQ(idx.depth(ids[0]), 4);
  CHECK_EQ(idx.depth(ids[5]), 9);
  std::vector<int32_t> got(4);
  CHECK_EQ(idx.acquire(k.data() + 6, 4, 2, got.data(), &k[5]), 4u);
  CHECK_EQ(got[0], ids[4]);
  CHECK_EQ(got[1], ids[5]);
  idx.release(got.data(), 2);
  const BlockKey missing{1, 2};
  CHECK_EQ(idx.match(k.data() + 4, 6, &missing), 0u);        // an unknown parent matches nothing
  CHECK_EQ(idx.reserve(k.data() + 4, 6, 0, ids.data(), fresh.data(), &missing), 0u);
  idx.check_consistency();
}

TEST(entries_find_chain_blocks_at_any_depth) {
  RadixIndex idx(32, 0.0);
  auto k = keys_for(seq(100, 32));  // 8 blocks
  auto ids = store(idx, k);
  std::vector<uint8_t> ready(8);
  idx.contains_each(k.data(), 8, ready.data());
  for (auto r : ready) CHECK_EQ(r, 1);
  std::vector<int32_t> got(3);
  CHECK_EQ(idx.acquire_each(k.data() + 5, 3, got.data()), 3u);
  CHECK_EQ(got[0], ids[5]);
  idx.release(got.data(), 3);
  CHECK_EQ(idx.find(k[7]), ids[7]);
  // reserve_each of a chain block it holds copies nothing; a new key is a root entry.
  std::vector<BlockKey> mixed = {k[6], BlockKey{7, 7}};
  std::vector<int32_t> out(2);
  std::vector<uint8_t> fresh(2);
  CHECK_EQ(idx.reserve_each(mixed.data(), 2, out.data(), fresh.data()), 2u);
  CHECK(!fresh[0] && fresh[1]);
  CHECK_EQ(idx.depth(out[1]), 0);
  idx.commit(out.data() + 1, 1);
  idx.check_consistency();
}

TEST(the_listener_hears_evicted_ready_blocks_and_resets) {
  RadixIndex idx(4, 0.0);
  Recorder rec;
  idx.set_listener(&rec);
  auto a = keys_for(seq(0, 16));  // 4 blocks fill the pool
  store(idx, a);
  // A failed store leaves an unready block: its eviction is not a removal anyone heard of as stored.
  auto b = keys_for(seq(500, 8));
  std::vector<int32_t> ids(2);
  std::vector<uint8_t> fresh(2);
  CHECK_EQ(idx.reserve(b.data(), 2, 0, ids.data(), fresh.data()), 2u);
  CHECK_EQ(rec.removed.size(), 2u);
  CHECK(rec.removed[0] == a[3] && rec.removed[1] == a[2]);  // the tail goes first
  idx.release(ids.data(), 2);  // never written
  rec.removed.clear();
  auto c = keys_for(seq(900, 8));
  CHECK_EQ(idx.reserve(c.data(), 2, 0, ids.data(), fresh.data()), 2u);
  for (const BlockKey& key : rec.removed) CHECK(key != b[0] && key != b[1]);
  idx.commit(ids.data(), 2);
  idx.reset();
  CHECK_EQ(rec.cleared, 1);
  idx.check_consistency();
}

TEST(random_chains_entries_and_parents_keep_the_key_table_consistent) {
  const unsigned seed = std::random_device{}();
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  RadixIndex idx(48, 0.1);
  std::vector<std::vector<BlockKey>> chains;
  for (int c = 0; c < 12; ++c) chains.push_back(keys_for(seq(c % 4 * 1000 + c / 4 * 8, 64), 4));
  for (int step = 0; step < 3000; ++step) {
    const auto& k = chains[rng() % chains.size()];
    const size_t n = 1 + rng() % k.size();
    std::vector<int32_t> ids(n);
    std::vector<uint8_t> fresh(n);
    switch (rng() % 4) {
      case 0: {  // a chain from the root
        const size_t got = idx.reserve(k.data(), n, 0, ids.data(), fresh.data());
        std::vector<int32_t> mine;
        for (size_t i = 0; i < got; ++i)
          if (fresh[i]) mine.push_back(ids[i]);
        if (rng() % 5 == 0) idx.release(mine.data(), mine.size()); else idx.commit(mine.data(), mine.size());
        break;
      }
      case 1: {  // a chain from a parent somewhere along it
        const size_t p = rng() % n;
        const size_t got = p + 1 < n ? idx.reserve(k.data() + p + 1, n - p - 1, 0, ids.data(), fresh.data(), &k[p]) : 0;
        std::vector<int32_t> mine;
        for (size_t i = 0; i < got; ++i)
          if (fresh[i]) mine.push_back(ids[i]);
        idx.commit(mine.data(), mine.size());
        break;
      }
      case 2: {  // entries
        const size_t got = idx.reserve_each(k.data() + (n - 1) / 2, n - (n - 1) / 2, ids.data(), fresh.data());
        std::vector<int32_t> mine;
        for (size_t i = 0; i < got; ++i)
          if (fresh[i]) mine.push_back(ids[i]);
        idx.commit(mine.data(), mine.size());
        break;
      }
      default: {
        const size_t got = idx.acquire_each(k.data(), n, ids.data());
        idx.release(ids.data(), got);
      }
    }
    if (step % 50 == 0) idx.check_consistency();
  }
  idx.check_consistency();
  CHECK_EQ(idx.stats().num_locked, 0);
}

TEST(a_chain_adopts_lone_entries_of_its_keys) {
  RadixIndex idx(32, 0.0);
  auto k = keys_for(seq(7, 24));  // 6 blocks
  std::vector<int32_t> ids(6);
  std::vector<uint8_t> fresh(6);
  CHECK_EQ(idx.reserve_each(k.data() + 2, 2, ids.data(), fresh.data()), 2u);  // stored before their prefix
  idx.commit(ids.data(), 2);
  const int32_t e2 = ids[0], e3 = ids[1];
  CHECK_EQ(idx.reserve(k.data(), 6, 0, ids.data(), fresh.data()), 6u);
  CHECK(fresh[0] && fresh[1] && !fresh[2] && !fresh[3] && fresh[4] && fresh[5]);
  CHECK_EQ(ids[2], e2);
  CHECK_EQ(ids[3], e3);
  std::vector<int32_t> mine = {ids[0], ids[1], ids[4], ids[5]};
  idx.commit(mine.data(), mine.size());
  CHECK_EQ(idx.match(k.data(), 6), 6u);
  CHECK_EQ(idx.depth(e3), 3);
  CHECK_EQ(idx.stats().num_cached, 6);
  // A locked entry stays where it is, and the chain stops before it.
  auto other = keys_for(seq(50, 16));
  CHECK_EQ(idx.reserve_each(other.data() + 1, 1, ids.data(), fresh.data()), 1u);
  CHECK_EQ(idx.reserve(other.data(), 4, 0, ids.data() + 1, fresh.data() + 1), 1u);
  std::vector<int32_t> all = {ids[0], ids[1]};
  idx.commit(all.data(), 2);
  idx.check_consistency();
}

TEST_MAIN()
