"""The flexkv command: bench (the manual's table, --plot, --json) and check-config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexkv.core import bench_plots
from flexkv.core.bench import BenchResult
from flexkv.core.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_the_manual_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_png, out_json = tmp_path / "hit.png", tmp_path / "bench.json"
    rc = main(["bench", "--no-progress", "--model", "tiny", "--no-ssd", "--conversations", "60", "--concurrency", "40",
               "--turns", "4", "--capacities", "200,0.01GB", "--plot", str(out_png), "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    for column in ("config", "capacity", "block size", "hit rate", "transfer p50/p99", "throughput"):
        assert column in text
    assert "model: tiny, 1 KiB of KV per token" in text
    data = json.loads(out_json.read_text())
    results = {r["name"]: r for r in data}
    # 0.01 GiB is 655 blocks of 16 KiB (16 tokens x 1 KiB) and 327 of 32 KiB
    assert set(results) == {"1 small", "2 large", "sweep 200x16", "sweep 655x16", "sweep 200x32", "sweep 327x32"}
    small, large, tiny = results["1 small"], results["2 large"], results["sweep 200x16"]
    assert (small["tokens_per_block"], small["capacity_bytes"]) == (16, 2**29)  # the manual's 0.5 GiB
    assert (large["tokens_per_block"], large["capacity_bytes"]) == (32, 2**31)
    for r in results.values():
        assert r["requests"] == 240 and 0.0 < r["hit_rate"] < 1.0
        assert r["hit_tokens"] <= r["prompt_tokens"]
        assert r["load_ms"]["p5"] <= r["load_ms"]["p50"] <= r["load_ms"]["p99"]
    # A cache far smaller than the working set evicts and hits less.
    assert tiny["evicted_blocks"] > 0 and large["evicted_blocks"] == 0
    assert tiny["hit_rate"] < results["sweep 655x16"]["hit_rate"] <= small["hit_rate"] <= large["hit_rate"] + 0.02
    # The plots: one bar and one box per configuration, one line per block size over the swept capacities.
    figs = bench_plots.figures([BenchResult(**r) for r in data])
    bars = figs["hit_rate"].axes[0]
    assert bars.get_xlabel() == "hit rate (% of prompt tokens)"
    assert [t.get_text() for t in bars.get_yticklabels()] == ["1 small", "2 large"]
    assert len(bars.patches) == 2
    box = figs["latency"].axes[0]
    assert box.get_xlabel().startswith("load latency per request (ms")
    assert [t.get_text() for t in box.get_yticklabels()] == ["1 small", "2 large"]
    sweep = figs["capacity"].axes[0]
    assert sweep.get_xlabel() == "CPU tier capacity (GiB)" and sweep.get_ylabel() == "hit rate (% of prompt tokens)"
    lines = {line.get_label(): list(line.get_ydata()) for line in sweep.get_lines()}
    assert set(lines) == {"block 16 tokens", "block 32 tokens"}
    assert all(len(y) == 2 and y == sorted(y) for y in lines.values())  # more capacity, more hits
    for png in (out_png, tmp_path / "hit-latency.png", tmp_path / "hit-capacity.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_is_deterministic_and_leaves_a_configs_ssd_directory_alone(tmp_path: Path) -> None:
    live = tmp_path / "live-ssd"  # the directory of a running deployment's SSD tier
    live.mkdir()
    (live / "theirs").write_text("not the bench's")
    cfg = tmp_path / "ssd.json"
    cfg.write_text(json.dumps({"cache_config": {"num_cpu_blocks": 300, "tokens_per_block": 16, "enable_ssd": True,
                                                "num_ssd_blocks": 6000, "ssd_cache_dir": str(live)}}))
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        assert main(["bench", "--no-progress", "--model", "tiny", "--conversations", "30", "--concurrency", "15",
                     "--turns", "3", "--seed", "5", "--config", str(cfg), "--json", str(out)]) == 0
        runs.append(json.loads(out.read_text())[0])
    assert runs[0]["ssd_hit_tokens"] > 0
    for key in ("hit_tokens", "ssd_hit_tokens", "evicted_blocks"):
        assert runs[0][key] == runs[1][key], key
    assert sorted(p.name for p in live.iterdir()) == ["theirs"]


def test_bench_json_to_stdout_and_metrics_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--no-progress", "--model", "tiny", "--no-ssd", "--conversations", "10", "--concurrency",
                 "5", "--turns", "2", "--json", "-", "--metrics-overhead", "--overhead-rounds", "3"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # stdout is the JSON alone; the table went to stderr
    assert [r["name"] for r in data["results"]] == ["1 small", "2 large"] and "| config" in err
    o = data["metrics_overhead"]
    assert len(o["off_req_s"]) == 4 and len(o["on_req_s"]) == len(o["ratios"]) == len(o["cpu_ratios"]) == 3
    off, on = o["off_req_s"], o["on_req_s"]  # off, on, off, on, off, on, off: each on between two offs
    assert o["ratio"] == sorted(on[i] / ((off[i] + off[i + 1]) / 2) for i in range(3))[1] > 0
    (lo, hi), (q1, q3), (c1, c2) = o["ratio_range"], o["ratio_quartiles"], o["ratio_ci95"]
    assert lo <= q1 <= o["ratio"] <= q3 <= hi and lo <= c1 <= o["ratio"] <= c2 <= hi
    assert o["cpu_ratio"] > 0 and all(r["cpu_ms_per_request"] > 0 for r in data["results"])
    assert "metrics overhead: throughput with metrics on / off = " in err and "3 runs with metrics on" in err


def test_overhead_ratios_compare_each_run_with_the_runs_around_it() -> None:
    from flexkv.core.bench import median_ci95, overhead_summary

    # A machine that gets twice as fast during the measurement, metrics costing exactly 10%: every ratio says 0.9.
    off = [100.0, 150.0, 200.0]
    on = [0.9 * 125.0, 0.9 * 175.0]
    o = overhead_summary(off, on, [2.0, 2.0, 2.0], [2.5, 2.0])
    assert o["ratios"] == pytest.approx([0.9, 0.9]) and o["ratio"] == pytest.approx(0.9)
    assert o["cpu_ratios"] == pytest.approx([0.8, 1.0]) and o["cpu_ratio"] == pytest.approx(0.9)
    assert o["cpu_ratio_range"] == pytest.approx([0.8, 1.0])
    assert median_ci95([float(v) for v in range(1, 41)]) == [13.0, 28.0]  # n = 40: ranks 20 -/+ 6.2
    assert median_ci95([1.0, 2.0, 3.0]) == [1.0, 3.0]  # too few runs: the range


def test_bench_runs_configs_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"cache_config": {"num_cpu_blocks": 300, // a tiny cache\n "tokens_per_block": 64}}')
    assert main(["bench", "--no-progress", "--model", "tiny", "--conversations", "10", "--concurrency", "5",
                 "--config", str(cfg)]) == 0
    assert "300 blocks" in capsys.readouterr().out


def test_bench_rejects_a_config_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("worker_id", "0")  # the manual's ${worker_id}
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
    assert main(["bench", "--no-progress", "--model", "tiny", "--conversations", "30", "--concurrency", "15",
                 "--turns", "3", "--config", str(cpu_only), "--config", str(with_ssd), "--json", str(out_json)]) == 0
    cpu, ssd = json.loads(out_json.read_text())
    assert cpu["ssd_hit_tokens"] == 0 and ssd["ssd_hit_tokens"] > 0
    assert ssd["hit_rate"] > cpu["hit_rate"]
    assert ssd["hit_tokens"] >= ssd["ssd_hit_tokens"]
    assert "of which SSD" in capsys.readouterr().out
