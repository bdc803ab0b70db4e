#include "control/tier_flows.h"

#include <exception>
#include <string>

#include "control/log.h"

namespace flexkv {
namespace {

// A run as the SSD tier stores it: a chain whose parent the SSD lacks is kept
// as entries (their headers then restore as entries too).
KeyRun ssd_shape_of(const SsdTier& ssd, const KeyRun& run) {
  KeyRun out = run;
  if (run.chain() && run.has_parent && ssd.index().find(run.parent) < 0) {
    out.shape = KeyRun::Shape::kEntries;
    out.has_parent = false;
  }
  return out;
}

void release_quietly(RadixIndex& index, const int32_t* ids, size_t n, const char* what) {
  if (n == 0) return;
  try {
    index.release(ids, n);
  } catch (const std::exception& e) {  // an index bug must not stop the rest of the clean-up
    log_line(LogLevel::kError, std::string("SSD tier: releasing a ") + what + "'s blocks failed: " + e.what());
  }
}

}  // namespace

size_t run_match(const RadixIndex& index, const KeyRun& run) {
  if (run.chain()) return index.match(run.keys.data(), run.size(), run.index_parent());
  std::vector<uint8_t> ready(run.size());
  index.contains_each(run.keys.data(), run.size(), ready.data());
  size_t n = 0;
  while (n < ready.size() && ready[n]) ++n;
  return n;
}

size_t run_acquire(RadixIndex& index, const KeyRun& run, size_t start, size_t stop, int32_t* out) {
  if (run.chain()) return index.acquire(run.keys.data(), stop, start, out, run.index_parent());
  if (start > 0) {
    std::vector<uint8_t> ready(start);
    index.contains_each(run.keys.data(), start, ready.data());
    for (size_t i = 0; i < start; ++i)
      if (!ready[i]) return i;
  }
  return start + index.acquire_each(run.keys.data() + start, stop - start, out);
}

size_t run_reserve(RadixIndex& index, const KeyRun& run, size_t start, size_t stop, int32_t* ids, uint8_t* is_new) {
  if (run.chain()) return index.reserve(run.keys.data(), stop, start, ids, is_new, run.index_parent());
  if (start != 0) throw std::logic_error("run_reserve: entries are reserved from their first key");
  return index.reserve_each(run.keys.data(), stop, ids, is_new);
}

std::optional<Promotion> plan_promotion(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, size_t start) {
  const KeyRun on_ssd = ssd_shape_of(ssd, run);
  const size_t n_ssd = run_match(ssd.index(), on_ssd);
  if (n_ssd <= start) return std::nullopt;
  std::vector<int32_t> slots(n_ssd - start);
  const size_t got = run_acquire(ssd.index(), on_ssd, start, n_ssd, slots.data());
  if (got <= start) return std::nullopt;
  slots.resize(got - start);
  std::vector<int32_t> cpu_ids(got);
  std::vector<uint8_t> is_new(got);
  const size_t handled = run.chain() ? run_reserve(cpu.index(), run, start, got, cpu_ids.data(), is_new.data())
                                     : start + cpu.index().reserve_each(run.keys.data() + start, got - start,
                                                                        cpu_ids.data() + start, is_new.data() + start);
  // Only fresh CPU blocks are filled here: another task storing one of them stops the run.
  size_t stop = start;
  while (stop < handled && is_new[stop]) ++stop;
  std::vector<int32_t> leftover;
  for (size_t i = stop; i < handled; ++i)
    if (is_new[i]) leftover.push_back(cpu_ids[i]);
  cpu.index().release(leftover.data(), leftover.size());
  if (stop < got) ssd.index().release(slots.data() + (stop - start), got - stop);
  if (stop == start) return std::nullopt;
  Promotion p;
  p.start = start;
  p.stop = stop;
  p.slots.assign(slots.begin(), slots.begin() + static_cast<std::ptrdiff_t>(stop - start));
  p.cpu_ids.assign(cpu_ids.begin() + static_cast<std::ptrdiff_t>(start),
                   cpu_ids.begin() + static_cast<std::ptrdiff_t>(stop));
  return p;
}

void abandon_promotion(CpuTier& cpu, SsdTier& ssd, const Promotion& p) {
  ssd.index().release(p.slots.data(), p.slots.size());
  cpu.index().release(p.cpu_ids.data(), p.cpu_ids.size());
}

size_t run_promotion(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, const Promotion& p, FlowCounters& counters,
                     BlockEventLog& events) {
  const size_t n = p.stop - p.start;
  size_t good = 0;
  try {
    std::vector<int64_t> positions(n);
    for (size_t k = 0; k < n; ++k) positions[k] = static_cast<int64_t>(p.start + k);
    const SsdBatchResult r = ssd.read(cpu, p.cpu_ids.data(), p.slots.data(), run, positions.data(), n);
    while (good < n && r.status[good] == SsdStatus::kOk) ++good;
    std::vector<int32_t> mismatched, unreadable;
    std::vector<BlockKey> gone;
    for (size_t k = 0; k < n; ++k) {
      if (r.status[k] == SsdStatus::kMismatch) {
        mismatched.push_back(p.slots[k]);
        gone.push_back(run.keys[p.start + k]);
      } else if (r.status[k] == SsdStatus::kIoError) {
        unreadable.push_back(p.slots[k]);
      }
    }
    if (!mismatched.empty()) {
      ssd.drop(mismatched.data(), mismatched.size());  // wrong bytes: never read again
      events.removed(Tier::kSsd, gone.data(), gone.size());
      log_line(LogLevel::kWarning, "SSD tier: " + std::to_string(mismatched.size()) +
                                       " block(s) did not match their headers or checksums; dropped");
    }
    // Unreadable now: no match reaches them, and the next store rewrites them.
    if (!unreadable.empty()) ssd.index().set_ready(unreadable.data(), unreadable.size(), false);
    counters.ssd_mismatch_blocks += static_cast<int64_t>(mismatched.size());
    counters.ssd_read_errors += static_cast<int64_t>(r.io_errors());
    counters.ssd_hit_blocks += static_cast<int64_t>(good);
    if (good > 0) {
      cpu.index().set_ready(p.cpu_ids.data(), good, true);
      events.stored(Tier::kCpu, run, positions.data(), good);
    }
  } catch (const std::exception& e) {
    log_line(LogLevel::kError, std::string("SSD tier: promotion failed: ") + e.what());
    good = 0;
  }
  release_quietly(ssd.index(), p.slots.data(), p.slots.size(), "promotion");
  release_quietly(cpu.index(), p.cpu_ids.data() + good, n - good, "promotion");
  return p.start + good;
}

bool write_through(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, size_t n, bool whole, FlowCounters& counters,
                   BlockEventLog& events) {
  std::vector<int32_t> cpu_ids(n);
  const size_t got = run_acquire(cpu.index(), run, 0, n, cpu_ids.data());
  cpu_ids.resize(got);
  if (got < n && (whole || got == 0)) {
    cpu.index().release(cpu_ids.data(), cpu_ids.size());
    return got == 0 && !whole;
  }
  const KeyRun stored = ssd_shape_of(ssd, run);
  std::vector<int32_t> slots(got);
  std::vector<uint8_t> is_new(got, 0);
  const size_t handled = run_reserve(ssd.index(), stored, 0, got, slots.data(), is_new.data());
  // Blocks the SSD holds already (or cannot take) need no I/O: unlock them now.
  std::vector<int32_t> to_write, not_needed, mine;
  std::vector<int64_t> positions;
  for (size_t i = 0; i < got; ++i) {
    if (i < handled && is_new[i]) {
      to_write.push_back(cpu_ids[i]);
      mine.push_back(slots[i]);
      positions.push_back(static_cast<int64_t>(i));
    } else {
      not_needed.push_back(cpu_ids[i]);
    }
  }
  cpu.index().release(not_needed.data(), not_needed.size());
  if (mine.empty()) return true;
  try {
    const SsdBatchResult r = ssd.write(cpu, to_write.data(), mine.data(), run, positions.data(), mine.size());
    std::vector<int32_t> ok, bad;
    std::vector<int64_t> ok_positions;
    for (size_t k = 0; k < mine.size(); ++k) {
      if (r.status[k] == SsdStatus::kOk) {
        ok.push_back(mine[k]);
        ok_positions.push_back(positions[k]);
      } else {
        bad.push_back(mine[k]);
      }
    }
    ssd.index().commit(ok.data(), ok.size());
    ssd.index().release(bad.data(), bad.size());
    events.stored(Tier::kSsd, run, ok_positions.data(), ok_positions.size());
    counters.ssd_written_blocks += static_cast<int64_t>(ok.size());
    if (!bad.empty()) {
      counters.ssd_write_errors += static_cast<int64_t>(bad.size());
      log_line(LogLevel::kWarning, "SSD tier: " + std::to_string(bad.size()) +
                                       " block(s) not stored (I/O errors); they stay CPU-only");
    }
  } catch (const std::exception& e) {
    log_line(LogLevel::kError, std::string("SSD tier: write failed: ") + e.what());
    release_quietly(ssd.index(), mine.data(), mine.size(), "write-through");
    counters.ssd_write_errors += static_cast<int64_t>(mine.size());
  }
  cpu.index().release(to_write.data(), to_write.size());
  return true;
}

}  // namespace flexkv
