// Moving blocks between the CPU and SSD tiers: promotion before a get,
// write-through after a put. Each function takes the locks it needs on both
// tiers' indexes for as long as bytes move and leaves every lock as it found
// it, on every path; the CPU blocks a promotion fills stay locked for the load
// that asked for them. No function here holds any mutex across I/O.
//
// The run's shape picks the index methods: a chain walks from its parent (or
// the root), entries are looked up one by one wherever they are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "control/block_events.h"
#include "control/cpu_tier.h"
#include "control/key_run.h"
#include "control/ssd_tier.h"
#include "control/stats.h"
#include "control/task.h"

namespace flexkv {

// Leading blocks of the run the index holds ready.
size_t run_match(const RadixIndex& index, const KeyRun& run);
// Leading ready blocks of run[0, stop); locks those at positions >= start and
// writes their ids to out[0..]. Returns the leading count.
size_t run_acquire(RadixIndex& index, const KeyRun& run, size_t start, size_t stop, int32_t* out);
// The index's reserve() over run[0, stop) (entries: start must be 0). Returns
// how many were handled; ids and is_new are filled for those.
size_t run_reserve(RadixIndex& index, const KeyRun& run, size_t start, size_t stop, int32_t* ids, uint8_t* is_new);

// Locks the SSD blocks of run[start..) that the SSD holds and reserves CPU
// blocks for them. `start` is where the CPU tier's ready prefix ends. Stops
// where the CPU cannot give a fresh block (locked full, or another task is
// writing that block). nullopt when there is nothing to promote.
std::optional<Promotion> plan_promotion(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, size_t start);
// Gives back a planned promotion's locks without reading anything.
void abandon_promotion(CpuTier& cpu, SsdTier& ssd, const Promotion& p);
// Reads the promotion's blocks into the CPU tier and verifies them. Returns the
// end of the verified prefix: blocks [p.start, end) are ready in the CPU tier
// and still locked there; every other lock it held is gone.
size_t run_promotion(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, const Promotion& p, FlowCounters& counters,
                     BlockEventLog& events);
// Copies the ready CPU blocks of run[0, n) that the SSD lacks to the SSD. With
// `whole`, returns false, doing nothing, while some block of run[0, n) is not
// ready in the CPU tier (another put is still storing it); without, writes the
// ready prefix.
bool write_through(CpuTier& cpu, SsdTier& ssd, const KeyRun& run, size_t n, bool whole, FlowCounters& counters,
                   BlockEventLog& events);

}  // namespace flexkv
