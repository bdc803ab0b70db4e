"""The CPU tier's memory: a memfd that processes of the same user map through the tier's socket; nothing of
it is left anywhere once the processes that hold it are gone, however they end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexkv.core.cpu_tier import CpuTier, map_cpu_tier
from flexkv.core.errors import ConfigError

from kv_helpers import MiB

SHM = Path("/dev/shm")
MEMFD = "/memfd:flexkv-cpu-tier"


def memfd_inode(pid: int) -> os.stat_result:
    """The stat of the CPU tier's memfd among pid's descriptors."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(MEMFD):
                return os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    raise AssertionError(f"process {pid} holds no {MEMFD}")


def holders(inode: int) -> list[str]:
    """Every process that still holds memfd `inode`, by descriptor or by mapping."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith(MEMFD) and os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode:
                    found.append(f"{pid} fd {fd}")
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith(MEMFD) and int(parts[4]) == inode:
                    found.append(f"{pid} maps it")
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return found


def listening(socket_name: str) -> bool:
    return any(line.split()[-1] == socket_name for line in Path("/proc/net/unix").read_text().splitlines()[1:]
               if len(line.split()) == 8)


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd="/")


def test_tier_is_mapped_from_its_tier_info(rng: np.random.Generator) -> None:
    tier = CpuTier(num_blocks=8, block_bytes=3000, evict_ratio=0.0, block_align=4096)
    info = tier.tier_info()
    assert info["socket"].startswith(f"@flexkv-cpu-{os.getpid()}-") and listening(info["socket"])
    assert {k: info[k] for k in ("num_blocks", "block_stride", "block_bytes", "size")} == {
        "num_blocks": 8, "block_stride": 4096, "block_bytes": 3000, "size": 8 * 4096}
    assert not [p for p in SHM.iterdir() if str(os.getpid()) in p.name]  # no name in /dev/shm
    data = rng.integers(0, 256, (8, 3000), dtype=np.uint8)
    tier.blocks()[:] = data
    region = map_cpu_tier(info)  # as an engine worker in the owner's process maps it: the owner's mapping
    other = region.as_array().reshape(8, 4096)[:, :3000]
    assert region.address == tier.base and np.array_equal(other, data)
    other[5, 17] ^= 0xFF  # the same pages, not a copy
    assert tier.blocks()[5, 17] == data[5, 17] ^ 0xFF
    region.close()
    view = tier.blocks()
    tier.close()
    assert not listening(info["socket"])
    assert view[5, 17] == data[5, 17] ^ 0xFF and np.array_equal(other[:5], data[:5])  # views hold the mapping
    with pytest.raises(RuntimeError, match="nothing listens"):
        map_cpu_tier(info)
    tier.close()  # idempotent


def test_mapper_is_told_a_wrong_geometry_or_an_old_tier_info() -> None:
    tier = CpuTier(num_blocks=4, block_bytes=4096, evict_ratio=0.0)
    try:
        with pytest.raises(RuntimeError, match="another cache"):
            map_cpu_tier({**tier.tier_info(), "num_blocks": 5})
        with pytest.raises(ValueError, match="older FlexKV"):
            map_cpu_tier({"shm_name": "/flexkv-1-2-3", "num_blocks": 4, "block_stride": 4096, "block_bytes": 4096})
    finally:
        tier.close()


OWNER = """
import json, sys, time
import numpy as np
from flexkv.core.cpu_tier import CpuTier
tier = CpuTier(num_blocks=16, block_bytes=4 << 20, evict_ratio=0.0)
tier.blocks()[:] = np.random.default_rng(int(sys.argv[1])).integers(0, 256, (16, 4 << 20), dtype=np.uint8)
print(json.dumps(tier.tier_info()), flush=True)
time.sleep(600)
"""

MAPPER = """
import json, sys, time
import numpy as np
from flexkv.core.cpu_tier import map_cpu_tier
region = map_cpu_tier(json.loads(sys.argv[1]))
want = np.random.default_rng(int(sys.argv[2])).integers(0, 256, (16, 4 << 20), dtype=np.uint8)
print("same" if np.array_equal(region.as_array().reshape(16, 4 << 20), want) else "differs", flush=True)
time.sleep(600)
"""


def test_killed_owner_and_mapper_leave_nothing_behind(seed: int) -> None:
    shm_before = set(os.listdir(SHM))
    owner = spawn(OWNER, str(seed))
    mapper = None
    try:
        info = json.loads(owner.stdout.readline())
        st = memfd_inode(owner.pid)
        assert st.st_nlink == 0 and st.st_size == 64 * MiB  # no name in any filesystem
        mapper = spawn(MAPPER, json.dumps(info), str(seed))
        assert mapper.stdout.readline().strip() == "same"
        os.kill(owner.pid, signal.SIGKILL)  # as vLLM's --shutdown-timeout 0 does
        owner.wait(10)
        assert not listening(info["socket"])  # the name went with its owner
        assert holders(st.st_ino) == [f"{mapper.pid} maps it"]  # the memory lives while mapped ...
        os.kill(mapper.pid, signal.SIGKILL)
        mapper.wait(10)
        assert holders(st.st_ino) == []  # ... and no process holds it once the mapper is gone too: freed
        assert not [n for n in set(os.listdir(SHM)) - shm_before if str(owner.pid) in n]
    finally:
        for p in (owner, mapper):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


REFUSED = """
import json, os, sys
from flexkv.core.cpu_tier import map_cpu_tier
os.setuid(65534)  # nobody: imports done as the owner's user, the mapping tried as another
try:
    map_cpu_tier(json.loads(sys.argv[1]))
    print("mapped")
except RuntimeError as e:
    print(e)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid (the C++ test "
                    "test_memfd_region injects the owner's uid instead)")
def test_mapper_of_another_uid_is_refused() -> None:
    tier = CpuTier(num_blocks=4, block_bytes=4096, evict_ratio=0.0)
    try:
        info = json.dumps(tier.tier_info())
        out = subprocess.run([sys.executable, "-c", REFUSED, info], capture_output=True, text=True, cwd="/",
                             timeout=60)
        assert "refused" in out.stdout and "uid 65534" in out.stdout, out.stdout + out.stderr
        assert tier.refused == 1
        same_user = subprocess.run([sys.executable, "-c", REFUSED.replace("os.setuid(65534)", "pass"), info],
                                   capture_output=True, text=True, cwd="/", timeout=60)
        assert same_user.stdout.strip() == "mapped", same_user.stdout + same_user.stderr
    finally:
        tier.close()


def test_tier_larger_than_memory_is_a_clear_error() -> None:
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    with pytest.raises(ConfigError) as exc:
        CpuTier(num_blocks=2, block_bytes=total, evict_ratio=0.0)  # refused before any page is taken
    msg = str(exc.value)
    assert exc.value.key == "cache_config.num_cpu_blocks" and "cpu_cache_gb" in msg and "MemAvailable" in msg, msg
