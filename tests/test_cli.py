"""The flexkv command: bench (the manual's table, --plot, --json) and check-config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexkv.core.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_the_manual_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png, out_json = tmp_path / "hit.png", tmp_path / "bench.json"
    rc = main(["bench", "--no-progress", "--conversations", "60", "--concurrency", "40", "--turns", "4",
               "--capacities", "500", "--plot", str(out_png), "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    for column in ("config", "capacity", "block size", "hit rate", "transfer p50/p99", "throughput"):
        assert column in text
    results = {r["name"]: r for r in json.loads(out_json.read_text())}
    assert set(results) == {"1 small", "2 large", "3 small+ssd", "sweep 500x16", "sweep 500x32"}
    small, large, tiny = results["1 small"], results["2 large"], results["sweep 500x16"]
    with_ssd = results["3 small+ssd"]
    assert with_ssd["num_ssd_blocks"] == 100000 and small["ssd_hit_tokens"] == 0
    assert "of which SSD" in text
    assert (small["tokens_per_block"], small["num_cpu_blocks"]) == (16, 10000)
    assert (large["tokens_per_block"], large["num_cpu_blocks"]) == (32, 100000)
    for r in results.values():
        assert r["requests"] == 240 and 0.0 < r["hit_rate"] < 1.0
        assert r["hit_tokens"] <= r["prompt_tokens"]
    # A cache far smaller than the working set evicts and hits less.
    assert tiny["evicted_blocks"] > 0 and large["evicted_blocks"] == 0
    assert tiny["hit_rate"] < small["hit_rate"] <= large["hit_rate"] + 0.02
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_configs_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"cache_config": {"num_cpu_blocks": 300, // a tiny cache\n "tokens_per_block": 64}}')
    assert main(["bench", "--no-progress", "--conversations", "10", "--concurrency", "5", "--config", str(cfg)]) == 0
    assert "300 blocks" in capsys.readouterr().out


def test_bench_rejects_a_config_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--no-progress", "--config", str(REPO / "examples/configs/distributed_worker.json")])
    assert rc == 1
    assert "enable_remote" in capsys.readouterr().err


def test_check_config_is_a_flexkv_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["check-config", str(REPO / "examples/configs/cpu_only.json")])
    assert rc == 0
    assert "num_cpu_blocks" in capsys.readouterr().out


def test_console_script_and_manual_script_run() -> None:
    """The installed `flexkv` entry point and the manual's 17.3.2 script, as a user runs them."""
    exe = Path(sys.executable).with_name("flexkv")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "bench" in out and "check-config" in out
    out = subprocess.run([sys.executable, str(REPO / "examples/manual_perf_test.py")], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert lines[0].startswith("config1 (small, block 16): latency") and lines[1].startswith("config2 (large")
    rates = [float(line.rsplit("hit rate ", 1)[1].rstrip("%")) for line in lines]
    assert 0 < rates[0] < rates[1] < 100


def test_bench_shows_ssd_hits_separately(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text('{"cache_config": {"num_cpu_blocks": 300, "tokens_per_block": 16}}')
    with_ssd = tmp_path / "ssd.json"
    with_ssd.write_text(json.dumps({"cache_config": {
        "num_cpu_blocks": 300, "tokens_per_block": 16, "enable_ssd": True, "num_ssd_blocks": 6000,
        "ssd_cache_dir": str(tmp_path / "ssd")}}))
    out_json = tmp_path / "r.json"
    assert main(["bench", "--no-progress", "--conversations", "30", "--concurrency", "15", "--turns", "3",
                 "--config", str(cpu_only), "--config", str(with_ssd), "--json", str(out_json)]) == 0
    cpu, ssd = json.loads(out_json.read_text())
    assert cpu["ssd_hit_tokens"] == 0 and ssd["ssd_hit_tokens"] > 0
    assert ssd["hit_rate"] > cpu["hit_rate"]
    assert ssd["hit_tokens"] >= ssd["ssd_hit_tokens"]
    assert "of which SSD" in capsys.readouterr().out
