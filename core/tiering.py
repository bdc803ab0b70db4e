"""Moving blocks between the CPU and SSD tiers: write-through after a put, promotion before a get.

Each function holds the locks it needs on both tiers for as long as bytes move
and leaves every lock as it found it, on every path; the CPU blocks a promotion
fills stay locked for the load that asked for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .cpu_tier import CpuTier
from .ssd_tier import SsdTier

logger = logging.getLogger("flexkv")


@dataclass(frozen=True)
class Chain:
    """The block keys of one request and what a block header records of each block."""

    seed: np.ndarray    # uint64[2]: the namespace seed, parent of block 0
    keys: np.ndarray    # uint64[n, 2]
    tokens: np.ndarray  # int64[n_tokens]
    tokens_per_block: int

    def parents(self, start: int, stop: int) -> np.ndarray:
        prev = self.keys[max(start - 1, 0):stop - 1]
        return np.ascontiguousarray(np.concatenate([self.seed[None, :], prev]) if start == 0 else prev)

    def block_tokens(self, start: int, stop: int) -> np.ndarray:
        tpb = self.tokens_per_block
        return np.ascontiguousarray(self.tokens[start * tpb:stop * tpb].reshape(-1, tpb))

    def positions(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64)


@dataclass
class Promotion:
    """Blocks [start, stop) of a chain on their way from SSD slots into CPU blocks (both locked)."""

    start: int
    stop: int
    slots: np.ndarray    # int32, locked in the SSD index
    cpu_ids: np.ndarray  # int32, reserved (locked, unready) in the CPU index


@dataclass
class TierCounters:
    ssd_hit_tokens: int = 0         # tokens loaded from SSD into CPU for a get or prefetch
    ssd_mismatch_blocks: int = 0    # blocks whose bytes on SSD were wrong: dropped, a miss
    ssd_read_errors: int = 0
    ssd_written_blocks: int = 0
    ssd_write_errors: int = 0
    ssd_write_skipped_blocks: int = 0  # not written through: the queue was full or the prefix never got ready


def plan_promotion(cpu: CpuTier, ssd: SsdTier, chain: Chain, start: int) -> Promotion | None:
    """Locks the SSD blocks of chain[start:] that the SSD holds and reserves CPU blocks for them.

    ``start`` is where the CPU's ready prefix ends. Stops where the CPU cannot give a fresh block
    (the pool is locked full, or another task is writing that block).
    """
    n_ssd = ssd.index.match(chain.keys)
    if n_ssd <= start:
        return None
    got, slots = ssd.index.acquire(chain.keys[:n_ssd], start)
    if got <= start:
        return None
    cpu_ids, is_new = cpu.index.reserve(chain.keys[:got], start)
    fresh = is_new[start:]
    stop = start + (len(fresh) if fresh.all() else int(np.argmin(fresh)))
    leftover = cpu_ids[stop:][is_new[stop:]]
    if len(leftover):
        cpu.index.release(leftover)
    if stop < got:
        ssd.index.release(slots[stop - start:])
    if stop == start:
        return None
    return Promotion(start, stop, slots[: stop - start], cpu_ids[start:stop])


def abandon_promotion(cpu: CpuTier, ssd: SsdTier, p: Promotion) -> None:
    """Gives back a planned promotion's locks without reading anything."""
    ssd.index.release(p.slots)
    cpu.index.release(p.cpu_ids)


def run_promotion(cpu: CpuTier, ssd: SsdTier, chain: Chain, p: Promotion, counters: TierCounters) -> int:
    """Reads the promotion's blocks into the CPU and verifies them. Returns the end of the verified prefix:
    blocks [p.start, end) are ready in the CPU and still locked there; every other lock it held is gone."""
    end = p.start
    try:
        result = ssd.read(cpu, p.cpu_ids, p.slots, chain.keys[p.start:p.stop], chain.parents(p.start, p.stop),
                          chain.positions(p.start, p.stop), chain.block_tokens(p.start, p.stop))
        good = len(result.ok) if result.ok.all() else int(np.argmin(result.ok))
        end = p.start + good
        mismatched = int(result.mismatch.sum())
        if mismatched:
            ssd.drop(p.slots[result.mismatch])  # wrong bytes: never read again
            logger.warning("SSD tier: %d block(s) did not match their headers or checksums; dropped", mismatched)
        failed_io = ~result.ok & ~result.mismatch
        if failed_io.any():  # unreadable now: no match reaches it, and the next store rewrites it
            ssd.index.set_ready(p.slots[failed_io], False)
        counters.ssd_mismatch_blocks += mismatched
        counters.ssd_read_errors += result.io_errors
        counters.ssd_hit_tokens += good * chain.tokens_per_block
        if good:
            cpu.index.set_ready(p.cpu_ids[:good], True)
    except Exception as e:
        logger.error("SSD tier: promotion failed: %s", e)
        end = p.start
    finally:
        for index, ids in ((ssd.index, p.slots), (cpu.index, p.cpu_ids[end - p.start:])):
            try:
                if len(ids):
                    index.release(ids)
            except Exception as e:  # an index bug must not stop the rest of the clean-up
                logger.error("SSD tier: releasing a promotion's blocks failed: %s", e)
    return end


def write_through(cpu: CpuTier, ssd: SsdTier, chain: Chain, n: int, counters: TierCounters,
                  whole: bool = True) -> bool:
    """Copies the ready CPU blocks of chain[:n] that the SSD lacks to the SSD. With ``whole``, returns
    False, doing nothing, while some block of chain[:n] is not ready on the CPU (another put is still
    storing it); without, writes the ready prefix."""
    got, cpu_ids = cpu.index.acquire(chain.keys[:n], 0)
    try:
        if got < n and (whole or got == 0):
            return got == 0 and not whole
        slots, is_new = ssd.index.reserve(chain.keys[:got], 0)
        new = np.flatnonzero(is_new)
        # Blocks the SSD already holds need no I/O: unlock them now.
        needed = np.zeros(len(cpu_ids), dtype=bool)
        needed[new] = True
        cpu.index.release(cpu_ids[~needed])
        cpu_ids = cpu_ids[needed]
        if len(new) == 0:
            return True
        mine = slots[new]
        try:
            result = ssd.write(cpu, cpu_ids, mine, np.ascontiguousarray(chain.keys[new]),
                               np.ascontiguousarray(chain.parents(0, len(slots))[new]), new.astype(np.int64),
                               np.ascontiguousarray(chain.block_tokens(0, len(slots))[new]))
        except Exception as e:
            logger.error("SSD tier: write failed: %s", e)
            ssd.index.release(mine)
            counters.ssd_write_errors += len(mine)
            return True
        ssd.index.commit(mine[result.ok])
        ssd.index.release(mine[~result.ok])
        counters.ssd_written_blocks += int(result.ok.sum())
        failed = len(mine) - int(result.ok.sum())
        if failed:
            counters.ssd_write_errors += failed
            logger.warning("SSD tier: %d block(s) not stored (I/O errors); they stay CPU-only", failed)
        return True
    finally:
        if len(cpu_ids):
            cpu.index.release(cpu_ids)
