"""`flexkv serve` and its clients, each in its own process: blocks one client stores load byte-exact in
another; bad input is refused by name while the server keeps serving; a killed client's locks and
half-finished stores end with its lease; a killed server costs each call a bounded delay, and a restarted
one serves again; SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from server_helpers import (
    LEASE_S,
    TIMEOUT_S,
    ServerProcess,
    client,
    copy_task,
    server_config,
    settings,
    store_in_one_load_in_other,
)

from flexkv.core import ConfigError, DataPlane, KVManager, TaskError
from flexkv.core.config_file import load_config
from flexkv.core.remote_plane import query_stats
from flexkv.core.server_launch import ServerSettings
from flexkv.core.wire import ServerError, ServerUnavailable

from kv_helpers import configs, engine_for, free_tcp_port, random_tokens

TPB = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve")
    proc = ServerProcess(tmp, server_config(tmp, f"ipc://{tmp}/flexkv.sock")).start()
    yield proc
    assert proc.stop() == 0, proc.output()


def engine(kv, seed: int, blocks: int = 16):
    return engine_for(kv, num_blocks=blocks, gen=torch.Generator().manual_seed(seed))


def test_a_client_cannot_take_or_complete_another_clients_task(server: ServerProcess, rng) -> None:
    """Task ids start again in a restarted server: a client still holding an id of the old one must not end
    another client's task of the same id (a store completed that way would be readable before its bytes)."""
    owner, other = client(server.endpoint), client(server.endpoint)
    try:
        task, mask = owner.put_match(random_tokens(rng, 2 * TPB))
        assert mask.sum() == 2 * TPB
        with pytest.raises(TaskError, match="not a task of this session"):
            other.take_external(task, timeout=0)
        with pytest.raises(TaskError, match="not a task of this session"):
            other.finish_external(task, True)
        other.cancel(task)  # cancels nothing of the owner's
        owner.take_external(task)
        owner.finish_external(task, False, "the test copies nothing")
        assert owner.cache_stats()["cpu"]["num_locked"] == 0
    finally:
        owner.shutdown()
        other.shutdown()


def test_a_block_stored_by_one_client_loads_byte_exact_in_another(server: ServerProcess, rng, seed: int) -> None:
    writer, reader = client(server.endpoint), client(server.endpoint)
    try:
        store_in_one_load_in_other(writer, reader, rng, seed)
    finally:
        writer.shutdown()
        reader.shutdown()


def test_the_first_instance_starts_an_embedded_server_which_ends_with_it(tmp_path: Path, rng, seed: int) -> None:
    endpoint = f"ipc://{tmp_path}/embedded.sock"
    model, cache = configs()
    first = KVManager(model, cache, server_settings=settings(endpoint, server_launch_mode="embedded",
                                                             instance_num=2, instance_id=0))
    first.start()
    second = None
    try:
        child = first._server_child  # the embedded `flexkv serve` is the first manager's child
        assert child is not None and child.poll() is None
        assert query_stats(endpoint, "", timeout_s=1.0)["pid"] == child.pid
        second = KVManager(model, cache, server_settings=settings(endpoint, server_launch_mode="embedded",
                                                                  instance_num=2, instance_id=1))
        second.start()
        assert second._server_child is None, "only instance 0 starts a server"
        store_in_one_load_in_other(first, second, rng, seed)
    finally:
        if second is not None:
            second.shutdown()
        first.shutdown()
    assert child.returncode == 0, "SIGTERM from its parent's shutdown stops the embedded server cleanly"
    assert not Path(endpoint[len("ipc://"):]).exists()
    with pytest.raises(ServerUnavailable):
        query_stats(endpoint, "", timeout_s=0.3)


def test_a_client_of_another_model_is_refused_by_name(server: ServerProcess) -> None:
    with pytest.raises(ServerError, match="this server caches") as e:
        client(server.endpoint, num_layers=3)
    assert e.value.kind == "config"
    with pytest.raises(ServerError, match="tokens per block"):
        client(server.endpoint, tokens_per_block=32)
    kv = client(server.endpoint)  # the server still serves everyone else
    kv.shutdown()


def test_a_message_of_the_wrong_schema_is_refused_and_the_server_keeps_serving(server: ServerProcess) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(server.endpoint)
        for body in (b"\x93\x01\x02\x03", b"not msgpack at all", b'\x81\xa2op\xa8get_match'):
            sock.send_multipart([b"12345678", body])
            assert sock.poll(5000), "the server must answer a malformed message"
            rid, reply = sock.recv_multipart()
            assert rid == b"12345678" and b"schema" in reply
        sock.send_multipart([b"only one frame"])  # not a FlexKV client: dropped without an answer
        sock.close(0)
    finally:
        ctx.destroy(0)
    assert query_stats(server.endpoint)["refused"] >= 4


def test_a_second_server_on_the_same_endpoint_names_the_first(server: ServerProcess, tmp_path: Path) -> None:
    second = ServerProcess(tmp_path, server_config(tmp_path, server.endpoint)).start(wait=False)
    assert second.proc.wait(60) == 1
    assert f"another FlexKV server (pid {server.proc.pid}) serves {server.endpoint}" in second.output()
    query_stats(server.endpoint)  # the first one still answers


def test_socket_and_lock_files_are_owner_only(server: ServerProcess) -> None:
    path = server.endpoint[len("ipc://"):]
    for p in (path, path + ".lock"):
        mode = stat.S_IMODE(os.stat(p).st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"


@pytest.mark.parametrize("endpoint, why", [
    ("tcp://127.0.0.1:5599", "needs server_token"),
    ("tcp://*:5599", "explicit address"),
    ("tcp://0.0.0.0:5599", "explicit address"),
    ("ipc://relative/path", "absolute path"),
    ("inproc://x", "ipc:// and tcp://"),
])
def test_endpoints_the_server_refuses(tmp_path: Path, endpoint: str, why: str) -> None:
    proc = ServerProcess(tmp_path, server_config(tmp_path, endpoint)).start(wait=False)
    assert proc.proc.wait(60) == 1
    assert why in proc.output() and "server_" in proc.output()


def test_a_stale_socket_file_is_replaced_and_sigterm_removes_everything(tmp_path: Path) -> None:
    sock = tmp_path / "stale.sock"
    sock.write_text("left by a server that was killed")
    proc = ServerProcess(tmp_path, server_config(tmp_path, f"ipc://{sock}")).start()
    kv = client(proc.endpoint)
    tokens = np.arange(2 * TPB)
    task, _ = kv.put_match(tokens)  # held by the client when the server stops
    assert proc.stop(signal.SIGTERM) == 0
    assert "stopping" in proc.output()
    assert not sock.exists() and not Path(f"{sock}.lock").exists()
    with pytest.raises(ServerUnavailable):
        kv.try_wait([task])
    kv.shutdown()


def test_tcp_needs_the_token(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    proc = ServerProcess(tmp_path, server_config(tmp_path, endpoint, server_token="s3cret")).start()
    try:
        with pytest.raises(ServerError, match="server_token") as e:
            client(endpoint)
        assert e.value.kind == "auth"
        with pytest.raises(ServerError, match="server_token"):
            query_stats(endpoint, "wrong")
        kv = KVManager(*configs(), server_settings=settings(endpoint, server_token="s3cret"))
        kv.start()
        assert kv.lookup(np.arange(TPB)) == (0, 0)
        kv.shutdown()
    finally:
        assert proc.stop() == 0


_HOLDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from server_helpers import client
    kv = client({endpoint!r})
    pending = np.frombuffer(bytes.fromhex({pending!r}), dtype=np.int64)
    stored = np.frombuffer(bytes.fromhex({stored!r}), dtype=np.int64)
    put, _ = kv.put_match(pending)  # a store it takes and never finishes
    kv.take_external(put)
    get, _ = kv.get_match(stored)  # a load that locks the stored blocks
    print("HELD", put, get, flush=True)
    time.sleep(600)
""")


def test_a_killed_client_loses_its_locks_and_its_unfinished_store_with_its_lease(server: ServerProcess, rng,
                                                                                   seed: int, tmp_path: Path) -> None:
    owner = client(server.endpoint)
    try:
        stored = random_tokens(rng, 2 * TPB)
        src = engine(owner, seed)
        src.fill(range(2))
        plane = DataPlane(owner.tier_info(), src.engine_layout(), owner.cache_config)
        try:
            task, _ = owner.put_match(stored)
            copy_task(owner, plane, task, np.arange(2), store=True)
        finally:
            plane.close()
        pending = random_tokens(rng, 4 * TPB)
        code = _HOLDER.format(tests=str(Path(__file__).parent), endpoint=server.endpoint,
                              pending=pending.tobytes().hex(), stored=stored.tobytes().hex())
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
        line = holder.stdout.readline()
        assert line.startswith("HELD"), line
        before = owner.cache_stats()
        assert before["cpu"]["num_locked"] > 0, "the holder's get locks the stored blocks"
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + LEASE_S + 3
        while owner.cache_stats()["cpu"]["num_locked"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert owner.cache_stats()["cpu"]["num_locked"] == 0, "the dead client's locks must end with its lease"
        assert owner.lookup(pending) == (0, 0), "an unfinished store must never become readable"
        task, mask = owner.put_match(pending)  # its blocks are free to store again
        assert mask.sum() == 4 * TPB
        owner.cancel([task])
        assert query_stats(server.endpoint)["expired_sessions"] >= 1
    finally:
        owner.shutdown()


def test_a_killed_server_costs_each_call_a_bounded_delay_and_a_restarted_one_serves_warm_from_ssd(
        tmp_path: Path, rng, seed: int) -> None:
    ssd = {"enable_ssd": True, "num_ssd_blocks": 64, "ssd_cache_dir": str(tmp_path / "ssd")}
    proc = ServerProcess(tmp_path, server_config(tmp_path, f"ipc://{tmp_path}/restart.sock", cache_config=ssd)).start()
    kv = client(proc.endpoint)
    src, dst = engine(kv, seed), engine(kv, seed + 1)
    expected = src.fill(range(3))
    dst.poison()
    plane = DataPlane(kv.tier_info(), src.engine_layout(), kv.cache_config)
    try:
        tokens = random_tokens(rng, 3 * TPB)
        task, _ = kv.put_match(tokens)
        copy_task(kv, plane, task, np.arange(3), store=True)
        deadline = time.monotonic() + 10
        while kv.lookup(tokens)[1] < 3 * TPB:  # written through to SSD
            assert time.monotonic() < deadline, "the write-through to SSD did not finish"
            time.sleep(0.02)
        proc.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable, match="server_timeout_seconds"):
            kv.get_match(tokens)
        assert time.monotonic() - t0 < TIMEOUT_S + 0.5
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailable):  # backing off: fails at once
            kv.put_match(tokens)
        assert time.monotonic() - t0 < 0.1
        plane.close()
        proc.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                task, mask = kv.get_match(tokens)
                break
            except ServerUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert mask.sum() == 3 * TPB, "the restarted server finds the blocks on its SSD tier"
        plane = DataPlane(kv.tier_info(), dst.engine_layout(), kv.cache_config)  # the new server's CPU tier
        moved = copy_task(kv, plane, task, np.array([5, 6, 7]), store=False)
        assert sorted(moved) == [5, 6, 7]
        dst.assert_blocks([5, 6, 7], expected)
        dst.assert_poisoned([0, 1, 2, 8])
    finally:
        plane.close()
        kv.shutdown()
        proc.stop()


def test_flexkv_stats_prints_the_live_counters(server: ServerProcess, tmp_path: Path) -> None:
    kv = client(server.endpoint)
    try:
        kv.lookup(np.arange(TPB))
        out = subprocess.run([sys.executable, "-m", "flexkv.core.cli", "stats", "--endpoint", server.endpoint],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"FlexKV server pid {server.proc.pid} at {server.endpoint}" in out.stdout
        assert "client KVManager@" in out.stdout and " lookups" in out.stdout and "\ncpu " in out.stdout
    finally:
        kv.shutdown()


def test_server_settings_come_from_the_config_and_the_environment(tmp_path: Path) -> None:
    path = server_config(tmp_path, "ipc:///tmp/x.sock", server_client_mode=True, instance_num=2)
    s = ServerSettings.from_env({"FLEXKV_CONFIG_PATH": str(path), "FLEXKV_SERVER_LAUNCH_MODE": "external",
                                 "FLEXKV_INSTANCE_ID": "1"})
    assert (s.server_recv_port, s.server_client_mode, s.server_launch_mode, s.instance_num, s.instance_id) == \
        ("ipc:///tmp/x.sock", True, "external", 2, 1)
    with pytest.raises(ConfigError, match="server_launch_mode"):
        ServerSettings.from_env({"FLEXKV_SERVER_LAUNCH_MODE": "sideways"})


def test_the_configs_docs_server_md_shows_load_as_printed(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "server.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    heredoc = re.search(r"<<EOF\n(.*?)EOF\n", text, re.S)
    assert blocks and heredoc
    shared = tmp_path / "shared.json"
    shared.write_text(blocks[0])
    cfg = load_config(shared)
    s = ServerSettings.of(cfg)
    assert (s.instance_num, s.server_launch_mode) == (2, "external") and cfg.model_config.tp_size == 2
    worker = tmp_path / "worker.json"
    worker.write_text(heredoc.group(1).replace("${i}", "1"))
    cfg = load_config(worker)
    assert cfg.server_recv_port == "ipc:///tmp/flexkv_1_test" and cfg.cache_config.tokens_per_block == 64
