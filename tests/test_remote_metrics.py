"""The remote tier in FlexKV's metrics, on real servers (SeaweedFS's S3 and Redis on 127.0.0.1): its row
(hits, misses, stored, evictions, errors), the bytes and objects it moved and its job latencies, scraped from a
manager's Prometheus endpoint with prometheus_client's parser; its circuit breakers' states as Redis dies and
comes back; `flexkv stats` of a `flexkv serve` with a remote tier (table and --json)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from server_helpers import ServerProcess, client, server_config, store_in_one_load_in_other

from flexkv.core.cli import main as cli_main
from flexkv.core.metrics import metric_names, render_table, summary_line
from flexkv.core.remote_metrics import remote_metric_names
from flexkv.core.remote_plane import query_stats
from flexkv.core.server_launch import ServerSettings

from kv_helpers import S, store

TPB = 16
N = 8


def L(**labels: str) -> tuple[tuple[str, str], ...]:  # noqa: N802  (a label set, as scrape keys them)
    return tuple(sorted(labels.items()))


def breakers(kv) -> dict[str, dict]:
    return {s["server"]: s for s in kv.metrics_snapshot()["remote"]["servers"]}


def test_remote_tier_counts_scraped_from_both_nodes(make_kv, remote, free_port, scrape, capsys) -> None:
    ports = [free_port(), free_port()]
    a, b = (make_kv(ssd=False, server_settings=ServerSettings(metrics_port=p, num_log_interval_requests=0),
                    **remote.cache(num_remote_blocks=N + 2)) for p in ports)
    tokens = a.tokens(N * TPB)
    a.eng.fill(list(range(N)))
    store(a.kv, tokens, list(range(N)))
    assert a.kv.flush_remote(10)
    task, mask = b.kv.get_match(tokens)  # every block comes up from the remote tier first
    assert int(mask.sum()) == N * TPB
    b.kv.launch(task, b.slots(list(range(20, 20 + N))))
    assert b.kv.wait(task)[task].status is S.SUCCESS
    missing = b.tokens(3 * TPB)
    assert b.kv.lookup(missing) == (0, 0)  # asks the remote index: 3 misses
    ga, gb = (scrape(f"http://127.0.0.1:{p}/metrics") for p in ports)
    sa, sb = a.kv.cache_stats(), b.kv.cache_stats()

    obj = a.kv.control_plane.object_bytes
    names = {name for name, _ in ga}
    assert metric_names() | remote_metric_names() <= names, (metric_names() | remote_metric_names()) - names
    assert ga[("flexkv_tier_stored_blocks_total", L(tier="remote"))] == sa["remote_written_blocks"] == N
    assert ga[("flexkv_transfer_bytes_total", L(src="cpu", dst="remote"))] == N * obj
    assert ga[("flexkv_tier_capacity_blocks", L(tier="remote"))] == N + 2
    assert ga[("flexkv_tier_used_blocks", L(tier="remote"))] == N  # the index's size after the write-through
    assert ga[("flexkv_latency_seconds_count", L(op="remote_write_through"))] >= 1
    assert gb[("flexkv_tier_hit_blocks_total", L(tier="remote"))] == sb["remote_hit_blocks"] == N
    assert gb[("flexkv_tier_hit_tokens_total", L(tier="remote"))] == N * TPB
    assert gb[("flexkv_tier_miss_blocks_total", L(tier="remote"))] == 3
    assert gb[("flexkv_remote_fetched_blocks_total", ())] == N
    assert gb[("flexkv_transfer_bytes_total", L(src="remote", dst="cpu"))] == N * obj
    assert gb[("flexkv_latency_seconds_count", L(op="remote_promotion"))] >= 1
    assert gb[("flexkv_tier_verification_failures_total", L(tier="remote"))] == 0
    for got in (ga, gb):
        states = {dict(k[1])["server"]: v for k, v in got.items() if k[0] == "flexkv_remote_breaker_state"}
        assert states == {"s3": 0, "redis": 0}  # closed
        assert got[("flexkv_remote_breaker_trips_total", L(server="redis", endpoint=remote.servers.redis_url))] == 0

    # Two more blocks of A's past num_remote_blocks: the least recently used leave the index, counted.
    more = np.concatenate([tokens, a.tokens(4 * TPB)])
    a.eng.fill(list(range(N, N + 4)))
    store(a.kv, more, list(range(N + 4)))
    assert a.kv.flush_remote(10)
    ga = scrape(f"http://127.0.0.1:{ports[0]}/metrics")
    assert ga[("flexkv_tier_evicted_blocks_total", L(tier="remote"))] == 2
    assert ga[("flexkv_tier_used_blocks", L(tier="remote"))] == N + 2

    snap = b.kv.metrics_snapshot()
    table = render_table(snap, TPB)
    row = next(line for line in table.splitlines() if line.startswith("remote "))
    assert row.split()[1:5] == [str(N + 2), str(int(gb[("flexkv_tier_used_blocks", L(tier="remote"))])), "0",
                                str(N)]
    assert "s3 " in table and "redis " in table and "closed" in table
    line = summary_line(None, snap, TPB)
    assert f"remote: {N} hits, 3 misses" in line and "s3 closed, redis closed" in line
    capsys.readouterr()
    assert cli_main(["stats", "--metrics", f"127.0.0.1:{ports[1]}", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["counters"]["remote_hit_blocks"] == N
    assert {s["server"]: s["state"] for s in shown["remote"]["servers"]} == {"s3": "closed", "redis": "closed"}
    assert cli_main(["stats", "--metrics", f"127.0.0.1:{ports[1]}"]) == 0
    assert row in capsys.readouterr().out


def test_breaker_states_follow_redis_down_and_back(make_kv, remote, free_port, scrape) -> None:
    port = free_port()
    env = make_kv(ssd=False, server_settings=ServerSettings(metrics_port=port, num_log_interval_requests=0),
                  **remote.cache())
    tokens = env.tokens(N * TPB)
    assert breakers(env.kv)["redis"]["state"] == "closed"
    remote.servers.kill_redis()
    assert env.kv.lookup(tokens) == (0, 0)  # fails: the breaker opens
    redis = breakers(env.kv)["redis"]
    assert redis["state"] == "open" and redis["trips"] == 1 and redis["failures"] >= 1
    assert env.kv.lookup(tokens) == (0, 0)  # refused at once while open
    assert breakers(env.kv)["redis"]["refused"] >= 1
    key = L(server="redis", endpoint=remote.servers.redis_url)
    got = scrape(f"http://127.0.0.1:{port}/metrics")
    assert got[("flexkv_remote_breaker_state", key)] == 2
    assert got[("flexkv_remote_breaker_trips_total", key)] == 1
    assert got[("flexkv_remote_refused_requests_total", key)] >= 1
    assert got[("flexkv_remote_index_errors_total", ())] >= 2
    assert got[("flexkv_tier_miss_blocks_total", L(tier="remote"))] == 2 * N
    assert got[("flexkv_remote_breaker_state", L(server="s3", endpoint=remote.servers.s3_url))] == 0
    time.sleep(1.1)  # the cooldown (breaker_cooldown_s = 1): the next request is the probe
    assert breakers(env.kv)["redis"]["state"] == "half_open"
    remote.servers.ensure_up()
    env.kv.lookup(tokens)  # the probe succeeds: closed again
    assert breakers(env.kv)["redis"]["state"] == "closed"
    assert scrape(f"http://127.0.0.1:{port}/metrics")[("flexkv_remote_breaker_state", key)] == 0


def test_flexkv_stats_of_a_server_with_a_remote_tier(tmp_path: Path, remote, rng, seed: int) -> None:
    endpoint = f"ipc://{tmp_path}/flexkv.sock"
    proc = ServerProcess(tmp_path, server_config(tmp_path, endpoint, cache_config=remote.cache()))
    proc.start()
    try:
        first, second = client(endpoint), client(endpoint)
        try:
            store_in_one_load_in_other(first, second, rng, seed)
        finally:
            first.shutdown()
            second.shutdown()
        deadline = time.monotonic() + 10  # the server writes the 4 blocks through in the background
        while (query_stats(endpoint).get("remote") or {}).get("index_blocks") != 4:
            assert time.monotonic() < deadline, query_stats(endpoint).get("remote")
            time.sleep(0.1)
        cli = subprocess.run([sys.executable, "-m", "flexkv.core.cli", "stats", "--server", endpoint],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
        cli_json = subprocess.run([sys.executable, "-m", "flexkv.core.cli", "stats", "--server", endpoint, "--json"],
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        assert proc.stop() == 0
    assert cli.returncode == 0, cli.stderr
    assert "\nremote " in cli.stdout and "remote servers" in cli.stdout, cli.stdout
    assert f"s3 {remote.servers.s3_url}: closed" in cli.stdout
    s = json.loads(cli_json.stdout)
    assert s["counters"]["remote_written_blocks"] == 4
    assert {b["server"]: b["state"] for b in s["remote"]["servers"]} == {"s3": "closed", "redis": "closed"}
    assert s["remote"]["index_blocks"] == 4
