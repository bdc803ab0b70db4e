"""Progress of long startups: an SSD tier's warm restart rebuilds its index from the block headers and logs
how far it got (slots scanned of the total, blocks found, rate, ETA) at most every
FLEXKV_PROGRESS_INTERVAL_S seconds, then a summary with the blocks restored."""

from __future__ import annotations

import logging
import re

import pytest

from flexkv.core.errors import ConfigError
from flexkv.core.progress import progress_interval_s

from kv_helpers import store

TPB = 16
BLOCKS = 600
PROGRESS = re.compile(r"SSD tier: restoring the index from block headers: (\d+)/(\d+) slots scanned \(\d+%\), "
                      r"(\d+) blocks found, \d+ slots/s, ETA [\d.]+ s")
SUMMARY = re.compile(r"SSD tier: .* (\d+) blocks restored \((\d+) slots scanned in [\d.]+ s\)")


def test_warm_restart_of_an_ssd_tier_logs_its_progress(make_kv, monkeypatch, flexkv_log) -> None:
    monkeypatch.setenv("FLEXKV_PROGRESS_INTERVAL_S", "0")  # a line after every scan batch
    sizes = {"num_cpu_blocks": BLOCKS + 64, "num_ssd_blocks": 4096, "engine_blocks": BLOCKS}
    first = make_kv(ssd=True, **sizes)
    tokens = first.tokens(BLOCKS * TPB)
    first.eng.fill(list(range(BLOCKS)))
    store(first.kv, tokens, range(BLOCKS), completely=True)
    assert first.kv.control_plane.flush(30.0)
    assert first.kv.cache_stats()["ssd"]["num_cached"] == BLOCKS
    first.kv.shutdown()
    flexkv_log.clear()

    second = make_kv(ssd=True, **sizes)  # the same SSD directory: a warm restart
    lines = [r.getMessage() for r in flexkv_log if r.levelno == logging.INFO]
    steps = [tuple(int(g) for g in m.groups()) for m in map(PROGRESS.search, lines) if m]
    assert len(steps) >= 2, lines
    scanned, totals, found = zip(*steps)
    assert all(b > a for a, b in zip(scanned, scanned[1:])), steps  # slots scanned only grow
    assert all(b >= a for a, b in zip(found, found[1:])), steps
    assert len(set(totals)) == 1 and scanned[-1] < totals[0] and found[-1] <= BLOCKS
    summary = [m for m in map(SUMMARY.search, lines) if m]
    assert len(summary) == 1, lines
    restored, swept = (int(g) for g in summary[0].groups())
    assert restored == BLOCKS == second.kv.cache_stats()["ssd"]["num_cached"]
    assert swept == totals[0]
    assert second.kv.lookup(tokens) == (0, BLOCKS * TPB)  # the restored blocks are found again


def test_progress_interval_is_read_from_the_environment() -> None:
    assert progress_interval_s({}) == 2.0
    assert progress_interval_s({"FLEXKV_PROGRESS_INTERVAL_S": "0.5"}) == 0.5
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ConfigError, match="FLEXKV_PROGRESS_INTERVAL_S"):
            progress_interval_s({"FLEXKV_PROGRESS_INTERVAL_S": bad})
