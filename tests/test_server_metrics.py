"""`flexkv serve` with metrics: two engines (clients in their own managers) use one server; its Prometheus
endpoint, scraped with prometheus_client's parser, and `flexkv stats` show the same counters, and the
server logs its periodic line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from server_helpers import TPB, ServerProcess, client, server_config, store_in_one_load_in_other

from flexkv.core.remote_plane import query_stats


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on the metrics port {port}"
            time.sleep(0.05)


def test_flexkv_stats_and_the_metrics_endpoint_of_a_server_two_engines_use(tmp_path: Path, free_port, scrape, rng,
                                                                           seed: int) -> None:
    port = free_port()
    endpoint = f"ipc://{tmp_path}/flexkv.sock"
    proc = ServerProcess(tmp_path, server_config(tmp_path, endpoint, metrics_port=port, num_log_interval_requests=2))
    proc.start()
    try:
        wait_listening(port)  # the endpoint opens just after the server answers
        first, second = client(endpoint), client(endpoint)
        try:
            store_in_one_load_in_other(first, second, rng, seed)
            store_in_one_load_in_other(second, first, rng, seed + 7)
            got = scrape(f"http://127.0.0.1:{port}/metrics")
            stats = query_stats(endpoint)
            cli = subprocess.run([sys.executable, "-m", "flexkv.core.cli", "stats", "--server", endpoint],
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path)
            cli_json = subprocess.run([sys.executable, "-m", "flexkv.core.cli", "stats", "--server", endpoint,
                                       "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        finally:
            first.shutdown()
            second.shutdown()
        deadline = time.monotonic() + 5
        while " gets, " not in proc.output() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        assert proc.stop() == 0
    c = stats["counters"]
    assert c["get_hit_blocks"] == 8 and c["put_stored_blocks"] == 8
    assert got[("flexkv_tier_hit_tokens_total", (("tier", "cpu"),))] == 8 * TPB
    assert got[("flexkv_tier_stored_blocks_total", (("tier", "cpu"),))] == 8
    assert got[("flexkv_latency_seconds_count", (("op", "load"),))] == 2
    assert got[("flexkv_latency_seconds_count", (("op", "store"),))] == 2
    assert got[("flexkv_server_sessions", ())] == 2  # both engines were connected at the scrape
    assert got[("flexkv_server_requests_total", ())] > 0
    assert cli.returncode == 0, cli.stderr
    assert "clients 2" in cli.stdout
    row = next(line.split() for line in cli.stdout.splitlines() if line.startswith("cpu "))
    assert row[4] == "8" and row[6] == str(8 * TPB)  # hits, hit tokens
    assert "load" in cli.stdout and "p50" in cli.stdout
    assert json.loads(cli_json.stdout)["counters"]["get_hit_blocks"] == 8
    assert "hit rate" in proc.output() and " gets, " in proc.output()
