"""FlexKV's metrics: the control plane's counters, latency histograms and queue depths, scraped over HTTP from
an in-process manager's Prometheus endpoint (config ``metrics_port``) with prometheus_client's parser, equal
to what the manager reports itself; the periodic log line; rate-limited failure lines."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from flexkv.core.cli import main as cli_main
from flexkv.core.log import RateLimitFilter
from flexkv.core.metrics import metric_names, render_table, summary_line
from flexkv.core.server_launch import ServerSettings

from kv_helpers import store, try_load

TPB = 16
REPO = Path(__file__).resolve().parents[1]


def L(**labels: str) -> tuple[tuple[str, str], ...]:  # noqa: N802  (a label set, as scrape keys them)
    return tuple(sorted(labels.items()))


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_scraped_metrics_equal_the_managers_own_counters(make_kv, free_port, scrape, capsys) -> None:
    port = free_port()
    lines = Lines()
    logging.getLogger("flexkv").addHandler(lines)
    logging.getLogger("flexkv").setLevel(logging.INFO)
    try:
        settings = ServerSettings(metrics_port=port, num_log_interval_requests=3)
        env = make_kv(ssd=True, num_cpu_blocks=8, head_size=64, server_settings=settings)
        kv = env.kv
        assert kv.metrics_port == port
        tokens = env.tokens(6 * TPB + 3)
        env.eng.fill(list(range(6)))
        store(kv, tokens, range(6), completely=True)
        for _ in range(3):  # other sequences push the first out of the 8-block CPU tier
            env.eng.fill(list(range(40, 48)))
            store(kv, env.tokens(8 * TPB), range(40, 48), completely=True)
        mask, res = try_load(kv, tokens, range(10, 16))  # comes back from SSD
        assert res.ok and mask.sum() == 6 * TPB
        mask, res = try_load(kv, tokens, range(10, 16))  # now from the CPU tier
        assert res.ok
        try_load(kv, env.tokens(2 * TPB), range(20, 22))  # a miss
        kv.control_plane.flush(10.0)
        stats, snap = kv.cache_stats(), kv.metrics_snapshot()
        got = scrape(f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 5  # the log thread reads the counters every 0.5 s
        while not any(" gets, " in line for line in lines.lines) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        logging.getLogger("flexkv").removeHandler(lines)
    names = {name for name, _ in got}
    assert metric_names() <= names, metric_names() - names
    c = snap["counters"]
    assert c["get_cpu_hit_blocks"] + c["get_ssd_hit_blocks"] == c["get_hit_blocks"] == stats["get_hit_blocks"]
    assert c["get_ssd_hit_blocks"] > 0 and c["get_cpu_hit_blocks"] > 0
    assert got[("flexkv_tier_hit_tokens_total", L(tier="cpu"))] == c["get_cpu_hit_blocks"] * TPB
    assert got[("flexkv_tier_hit_tokens_total", L(tier="ssd"))] == c["get_ssd_hit_blocks"] * TPB
    assert got[("flexkv_hit_tokens_total", ())] == stats["get_hit_tokens"]
    assert got[("flexkv_tier_miss_blocks_total", L(tier="cpu"))] == c["get_query_blocks"] - c["get_cpu_hit_blocks"]
    assert got[("flexkv_tier_stored_blocks_total", L(tier="ssd"))] == stats["ssd_written_blocks"] == 30
    assert got[("flexkv_tier_stored_blocks_total", L(tier="cpu"))] == stats["put_stored_blocks"] == 30
    assert got[("flexkv_tier_used_blocks", L(tier="cpu"))] == stats["cpu"]["num_cached"] <= 8
    assert got[("flexkv_tier_capacity_blocks", L(tier="ssd"))] == stats["ssd"]["capacity"]
    assert got[("flexkv_tier_evicted_blocks_total", L(tier="cpu"))] == stats["cpu"]["evicted"] > 0
    assert got[("flexkv_tier_locked_blocks", L(tier="cpu"))] == 0
    block = kv.block_bytes
    assert got[("flexkv_transfer_bytes_total", L(src="cpu", dst="engine"))] == stats["get_loaded_blocks"] * block
    assert got[("flexkv_transfer_bytes_total", L(src="engine", dst="cpu"))] == 30 * block
    assert got[("flexkv_transfer_bytes_total", L(src="ssd", dst="cpu"))] == stats["ssd_hit_blocks"] * block
    assert got[("flexkv_transfer_bytes_total", L(src="cpu", dst="ssd"))] == 30 * block
    # Latencies: one load per get that moved blocks, one store per put, a promotion for the SSD hit.
    assert got[("flexkv_latency_seconds_count", L(op="load"))] == 2
    assert got[("flexkv_latency_seconds_count", L(op="store"))] == 4
    assert got[("flexkv_latency_seconds_count", L(op="get_match"))] == 3
    assert got[("flexkv_latency_seconds_count", L(op="promotion"))] >= 1
    assert got[("flexkv_latency_seconds_count", L(op="write_through"))] >= 4
    assert 0 < got[("flexkv_latency_seconds_sum", L(op="load"))] < 10
    assert got[("flexkv_latency_seconds_bucket", L(op="load", le="+Inf"))] == 2
    assert got[("flexkv_queue_depth", L(queue="tasks_in_flight"))] == 0
    assert got[("flexkv_requests_total", L(op="get"))] == 3
    # The periodic line: every 3 requests (7 here), with per-tier hit rates.
    logged = [line for line in lines.lines if line.startswith("FlexKV: ") and " gets, " in line]
    assert logged, lines.lines
    assert "hit rate" in logged[-1] and "cpu " in logged[-1] and "ssd " in logged[-1]
    table = render_table(snap, TPB)
    assert "hit tokens" in table and "\nssd " in table and "load" in table
    # flexkv stats --metrics: the same tier table, read back from the endpoint
    capsys.readouterr()
    assert cli_main(["stats", "--metrics", f"127.0.0.1:{port}"]) == 0
    shown = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith(("tier ", "cpu ", "ssd "))]
    assert len(rows) == 3 and all(row in shown for row in rows), shown
    kv.shutdown()  # the endpoint goes with the plane
    assert kv.metrics_port is None


def test_summary_line_counts_what_happened_since_the_last_one() -> None:
    def snap(gets: int, hits: int) -> dict:
        counters = {k: 0 for k in ("put_requests", "put_stored_blocks", "ssd_written_blocks", "tasks_failed",
                                   "ssd_mismatch_blocks", "ssd_read_errors", "ssd_write_errors", "put_dropped_blocks",
                                   "ssd_write_skipped_blocks", "get_ssd_hit_blocks")}
        counters.update(get_requests=gets, get_query_blocks=4 * gets, get_hit_blocks=hits, get_cpu_hit_blocks=hits)
        idx = {"capacity": 100, "num_cached": 10, "num_locked": 0, "num_free": 90, "evicted": 0}
        return {"counters": counters, "index": {"cpu": idx}, "histograms": {}, "gauges": {}}

    line = summary_line(snap(10, 20), snap(20, 40), TPB)
    assert line.startswith("FlexKV: 10 gets, 0 puts: hit rate 50.0% (cpu 50.0%), 320 hit tokens")
    assert "used cpu 10/100" in line


def test_failure_lines_are_rate_limited_per_kind() -> None:
    now = [0.0]
    f = RateLimitFilter(burst=2, window_s=60, clock=lambda: now[0])

    def rec(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("flexkv", level, __file__, 1, msg, args, None)

    kept = [f.filter(rec("FlexKV: load for request %s failed, served as a miss: %s", i, "timeout")) for i in range(50)]
    assert kept == [True, True] + [False] * 48  # one kind whatever the request id
    assert f.filter(rec("FlexKV: store for request 1 failed, the store is skipped: x"))  # another kind
    assert all(f.filter(rec("info %d", i, level=logging.INFO)) for i in range(10))  # info is never limited
    now[0] = 61.0
    r = rec("FlexKV: load for request %s failed, served as a miss: %s", 99, "timeout")
    assert f.filter(r)
    assert "48 more like it" in r.getMessage()


def test_histogram_bounds_cover_loads_to_stalls(make_kv) -> None:
    env = make_kv()
    h = env.kv.metrics_snapshot()["histograms"]["load"]
    assert h["bounds"][0] <= 1e-4 and h["bounds"][-1] >= 10 and len(h["counts"]) == len(h["bounds"]) + 1
    assert np.all(np.diff(h["bounds"]) > 0)


def test_every_metric_the_grafana_dashboard_queries_exists(make_kv, remote, free_port, scrape) -> None:
    """examples/grafana/flexkv.json queries only series a FlexKV endpoint serves (scraped from a live one with
    all three tiers: CPU, SSD and the remote tier on real S3 and Redis servers)."""
    port = free_port()
    env = make_kv(ssd=True, server_settings=ServerSettings(metrics_port=port, num_log_interval_requests=0),
                  **remote.cache())
    tokens = env.tokens(3 * TPB)
    env.eng.fill([0, 1, 2])
    store(env.kv, tokens, [0, 1, 2], completely=True)
    assert env.kv.flush_remote(10)
    try_load(env.kv, tokens, [3, 4, 5])
    served = {name for name, _ in scrape(f"http://127.0.0.1:{port}/metrics")}
    dashboard = json.loads((REPO / "examples/grafana/flexkv.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(next(v["query"] for v in dashboard["templating"]["list"] if v["name"] == "job"))
    queried = {m for e in exprs for m in re.findall(r"\b(flexkv_[a-z_]+)", e)}
    assert len(queried) >= 15, queried
    assert queried <= served, queried - served
    assert len(dashboard["panels"]) == len({p["id"] for p in dashboard["panels"]})
