"""Machine resources: whether the cache tiers fit this machine's memory and disks, and ``describe``.

The CPU tier is anonymous shared memory (a memfd): it is not limited by /dev/shm's size but by the memory the
kernel can give (MemAvailable) and by the memory cgroup the owning process runs in (a container's limit), or
it takes hugetlb pages (``use_hugepage_cpu_buffer``) when enough are free. The readers
(:func:`read_mem_available`, :func:`read_cgroup_room`, :func:`read_hugepages_free`, :func:`read_disk_free`) look
at /proc/meminfo, the cgroup's files and statvfs; :func:`check_resources` and :func:`require_resources` compare
them with the bytes each tier needs; :func:`describe` prints a config resolved, with the bytes per block and per
tier.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import (
    _SIZE_PAIRS,
    _TOP_SCALARS,
    MODEL_PRESETS,
    CacheConfig,
    FlexKVConfig,
    GiB,
    ModelConfig,
    format_bytes,
)
from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------------

def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field: bytes for the "kB" ones, the count for the others (HugePages_Free)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return None


def read_mem_available() -> int | None:
    """MemAvailable: the memory the kernel can give without swapping, the CPU tier's memfd included."""
    return _meminfo("MemAvailable")


def read_cgroup_room() -> int | None:
    """Bytes left under this process's memory cgroup limit (v2 memory.max, v1 memory.limit_in_bytes), which
    the CPU tier's memfd pages are charged to; None when no limit is set or none can be read."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < (1 << 60):
            return max(0, int(limit_text) - usage)
        return None
    return None


def read_hugepages_free() -> int | None:
    """Bytes of free hugetlb pages (HugePages_Free x Hugepagesize), which use_hugepage_cpu_buffer takes when
    they hold the whole CPU tier; they are not part of MemAvailable."""
    free, size = _meminfo("HugePages_Free"), _meminfo("Hugepagesize")
    return None if free is None or size is None else free * size


def read_disk_free(path: str) -> int | None:
    """Free bytes (for an unprivileged user) of the filesystem holding ``path``."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _existing_ancestor(path: str) -> Path:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100


Reader = Callable[[], int | None]


def _resource_problems(cache_config: CacheConfig, model_config: ModelConfig,
                       mem_available: Reader | None = None, cgroup_room: Reader | None = None,
                       hugepages_free: Reader | None = None,
                       disk_free: Callable[[str], int | None] | None = None) -> list[tuple[str, str]]:
    mem_available = mem_available or read_mem_available
    cgroup_room = cgroup_room or read_cgroup_room
    hugepages_free = hugepages_free or read_hugepages_free
    disk_free = disk_free or read_disk_free
    resolved = cache_config.resolved(model_config)
    block = model_config.block_bytes(resolved.tokens_per_block)
    problems: list[tuple[str, str]] = []

    # CPU tier: a memfd, charged to MemAvailable and to the memory cgroup (not to /dev/shm); with
    # use_hugepage_cpu_buffer, hugetlb pages instead when enough are free (the core falls back to ordinary pages
    # otherwise). With an SSD tier its blocks start on 4096-byte boundaries (O_DIRECT): whole pages each.
    cpu_block = -(-block // 4096) * 4096 if resolved.enable_ssd else block
    need = resolved.num_cpu_blocks * cpu_block
    huge = hugepages_free() if resolved.use_hugepage_cpu_buffer else None
    mem, cgroup = mem_available(), cgroup_room()
    limits = []
    if mem is not None:
        limits.append((mem, f"MemAvailable {format_bytes(mem)}"))
    if cgroup is not None:
        limits.append((cgroup, f"{format_bytes(cgroup)} left under the memory cgroup's limit"))
    if limits and need > min(v for v, _ in limits) and not (huge is not None and huge >= need):
        room = min(v for v, _ in limits)
        key, advice = _largest("cpu", cache_config.cpu_cache_gb is not None, room // cpu_block, block)
        fix = ""
        if cgroup is not None and cgroup == room and (mem is None or cgroup < mem):
            fix = "; or raise the memory limit of the container (docker run --memory) or cgroup"
        if huge is not None:
            fix += f"; or free enough hugetlb pages (HugePages_Free holds {format_bytes(huge)})"
        problems.append((key, f"{key}: the CPU tier needs {format_bytes(need)} of memory "
                              f"({resolved.num_cpu_blocks} blocks x {format_bytes(cpu_block)}) but only "
                              f"{format_bytes(room)} is available ({', '.join(t for _, t in limits)}; the tier is "
                              f"anonymous shared memory, not limited by /dev/shm); {advice}{fix}"))

    # SSD tier: the need is split evenly across the directories; directories on one filesystem add up.
    if resolved.enable_ssd and resolved.ssd_cache_dirs:
        dirs = resolved.ssd_cache_dirs
        per_dir_blocks = -(-resolved.num_ssd_blocks // len(dirs))
        groups: dict[Any, tuple[Path, list[str]]] = {}
        for d in dirs:
            anchor = _existing_ancestor(d)
            if anchor.exists() and not anchor.is_dir():
                problems.append(("cache_config.ssd_cache_dir",
                                 f"cache_config.ssd_cache_dir: {d!r} cannot be a directory ({anchor} is a file); "
                                 "give a directory path"))
                continue
            try:
                dev: Any = os.stat(anchor).st_dev
            except OSError:
                dev = str(anchor)
            groups.setdefault(dev, (anchor, []))[1].append(d)
        max_per_dir: int | None = None
        short = []
        for anchor, members in groups.values():
            free = disk_free(str(anchor))
            if free is None:
                continue
            fits = free // (block * len(members))
            max_per_dir = fits if max_per_dir is None else min(max_per_dir, fits)
            group_need = per_dir_blocks * block * len(members)
            if group_need > free:
                short.append(f"{', '.join(members)} need {format_bytes(group_need)} but the filesystem of {anchor} "
                             f"has {format_bytes(free)} free")
        if short and max_per_dir is not None:
            key, advice = _largest("ssd", cache_config.ssd_cache_gb is not None, max_per_dir * len(dirs), block)
            problems.append((key, f"{key}: the SSD tier needs {format_bytes(resolved.num_ssd_blocks * block)} of disk "
                                  f"({resolved.num_ssd_blocks} blocks x {format_bytes(block)}, split evenly over "
                                  f"{len(dirs)} dir(s)), and {'; '.join(short)}; {advice}"))
    return problems


def _largest(tier: str, by_gb: bool, largest_blocks: int, block: int) -> tuple[str, str]:
    """The key that sizes ``tier`` and advice naming its largest value that fits in ``largest_blocks`` blocks."""
    if by_gb:
        key = f"cache_config.{tier}_cache_gb"
        best = _floor2(largest_blocks * block / GiB)
        if best > 0:
            return key, f"the largest {tier}_cache_gb that fits is {best:g}"
    else:
        key = f"cache_config.num_{tier}_blocks"
        if largest_blocks > 0:
            return key, f"the largest num_{tier}_blocks that fits is {largest_blocks}"
    return key, f"not even one block ({format_bytes(block)}) fits"


def check_resources(cache_config: CacheConfig, model_config: ModelConfig, *,
                    mem_available: Reader | None = None, cgroup_room: Reader | None = None,
                    hugepages_free: Reader | None = None,
                    disk_free: Callable[[str], int | None] | None = None) -> list[str]:
    """Messages for each tier that does not fit this machine (empty when everything fits).

    The readers default to this machine (/proc/meminfo, the memory cgroup, statvfs); tests pass fakes.
    """
    return [msg for _, msg in _resource_problems(cache_config, model_config, mem_available, cgroup_room,
                                                 hugepages_free, disk_free)]


def require_resources(cache_config: CacheConfig, model_config: ModelConfig, *,
                      mem_available: Reader | None = None, cgroup_room: Reader | None = None,
                      hugepages_free: Reader | None = None,
                      disk_free: Callable[[str], int | None] | None = None) -> None:
    """Raise ConfigError (naming the first key that does not fit) when a tier does not fit this machine."""
    problems = _resource_problems(cache_config, model_config, mem_available, cgroup_room, hugepages_free,
                                  disk_free)
    if problems:
        raise ConfigError("; ".join(msg for _, msg in problems), problems[0][0])


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------

def describe(config: FlexKVConfig, model_config: ModelConfig | None = None, *,
             mem_available: Reader | None = None, cgroup_room: Reader | None = None,
             hugepages_free: Reader | None = None,
             disk_free: Callable[[str], int | None] | None = None, check_machine: bool = True) -> str:
    """The resolved config, one key a line, and (with a model) the bytes per block and per enabled tier.

    With ``check_machine`` it also says whether the tiers fit this machine (readers as in check_resources).
    """
    model = model_config or config.model_config
    cache = config.cache_config
    lines = ["FlexKV config:"]
    for name in _TOP_SCALARS:
        lines.append(f"  {name:<28} = {getattr(config, name)!r}")
    resolved = cache
    if model is not None:
        resolved = cache.resolved(model)
    lines.append("cache_config:")
    for f in dataclasses.fields(cache):
        value = getattr(resolved, f.name)
        note = ""
        for blocks_key, gb_key in _SIZE_PAIRS:
            gb = getattr(cache, gb_key)
            if f.name == blocks_key and gb is not None:
                note = f"  (from {gb_key} = {gb:g})" if model else f"  (computed from {gb_key} once a model is known)"
        if f.name in ("cpu_cache_gb", "ssd_cache_gb") and model is not None:
            value = getattr(cache, f.name)
        lines.append(f"  {f.name:<28} = {value!r}{note}")
    if model is None:
        lines.append("bytes: unknown: the bytes of a block need a model shape; add \"model_config\": "
                     "{\"num_layers\": 64, \"num_kv_heads\": 8, \"head_size\": 128, \"dtype\": \"bfloat16\"} "
                     f"to the file, or pass --model PRESET ({', '.join(sorted(MODEL_PRESETS))}) or --num-layers, "
                     "--num-kv-heads, --head-size, --dtype to flexkv check-config")
        return "\n".join(lines)
    block = model.block_bytes(resolved.tokens_per_block)
    lines.append(f"model_config: num_layers={model.num_layers} num_kv_heads={model.num_kv_heads} "
                 f"head_size={model.head_size} dtype={model.dtype_name} use_mla={model.use_mla} "
                 f"tp_size={model.tp_size} dp_size={model.dp_size}")
    lines.append("bytes:")
    lines.append(f"  per token                    = {format_bytes(model.token_size_in_bytes)} "
                 f"({model.token_size_in_bytes} B: {model.num_layers} layers x {model.bytes_per_token_per_layer} B)")
    lines.append(f"  per block                    = {format_bytes(block)} ({block} B: "
                 f"{resolved.tokens_per_block} tokens)")
    cpu_where = ("in anonymous shared memory (memfd): counted against MemAvailable and the memory cgroup, "
                 "not /dev/shm")
    if resolved.use_hugepage_cpu_buffer:
        cpu_where += "; hugetlb pages when HugePages_Free holds it"
    tiers = [("CPU", True, resolved.num_cpu_blocks, cpu_where),
             ("SSD", resolved.enable_ssd, resolved.num_ssd_blocks,
              f"over {len(resolved.ssd_cache_dirs)} dir(s)"),
             ("REMOTE", resolved.enable_remote, resolved.num_remote_blocks,
              f"at {resolved.remote_cache_path}" if resolved.remote_cache_path else "")]
    for name, enabled, blocks, where in tiers:
        if not enabled:
            lines.append(f"  {name + ' tier':<28} = disabled")
        elif blocks is None:
            lines.append(f"  {name + ' tier':<28} = size unknown (num_{name.lower()}_blocks is not set)")
        else:
            lines.append(f"  {name + ' tier':<28} = {format_bytes(blocks * block)} ({blocks} blocks x "
                         f"{format_bytes(block)}) {where}".rstrip())
    if not check_machine:
        lines.append("resources: not checked against this machine")
        return "\n".join(lines)
    problems = check_resources(cache, model, mem_available=mem_available, cgroup_room=cgroup_room,
                               hugepages_free=hugepages_free, disk_free=disk_free)
    if problems:
        lines.append("resources: DO NOT FIT on this machine:")
        lines.extend(f"  - {p}" for p in problems)
    else:
        lines.append("resources: fit on this machine")
    return "\n".join(lines)


__all__ = [
    "check_resources",
    "describe",
    "read_cgroup_room",
    "read_disk_free",
    "read_hugepages_free",
    "read_mem_available",
    "require_resources",
]
