"""Opening FlexKV's control plane: the one cache of the C++ core that every facade (KVManager, PageStore,
the C++ ``flexkv::Cache``) drives, from a model and a cache config.

The control plane owns the namespace and keys, the CPU tier (POSIX shared memory) and the SSD tier, the
task state machine, promotion and write-through, eviction, block events and the counters. A facade holds
a handle to one; several facades may share one handle (``KVManager.control_plane``), and then they share
every block: the same config means the same keys in every facade and language.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from typing import Any

from flexkv import _core

from .config import CacheConfig, ModelConfig
from .errors import ConfigError, FlexKVError
from .progress import progress_interval_s
from .remote_settings import remote_settings
from .remote_tier import RemoteTier
from .resources import require_resources

logger = logging.getLogger("flexkv")

ControlPlane = _core.ControlPlane
FaultInjectingIoEnv = _core.FaultInjectingIoEnv

# The core's log lines go to the `flexkv` logger; the sink is dropped at exit before the interpreter goes.
_core.set_log_sink(logger)
atexit.register(_core.set_log_sink, None)
_OPEN: weakref.WeakSet[Any] = weakref.WeakSet()  # planes opened here and not yet shut down
_REMOTE: weakref.WeakKeyDictionary[Any, RemoteTier] = weakref.WeakKeyDictionary()  # a plane's remote tier


@atexit.register  # registered after the sink's reset, so it runs before it
def _shut_down_open_planes() -> None:
    """Engines rarely shut their cache down: copies and write-throughs in flight finish before the process ends."""
    for plane in list(_OPEN):
        try:
            shutdown_plane(plane)
        except Exception:  # exiting anyway: a failure here must not hide the process's own exit status
            logger.exception("FlexKV: shutdown at exit failed")


_MAX_BLOCKS = 2**31 - 1  # block ids are int32


def checked_config(model_config: ModelConfig, cache_config: CacheConfig, *, server: bool = False) -> CacheConfig:
    """Validates a facade's configs and returns the cache config resolved for the model (block counts).
    ``server``: for ``flexkv serve`` and its clients, which serve several data-parallel ranks."""
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"model_config must be a flexkv ModelConfig, got {type(model_config).__name__}")
    if not isinstance(cache_config, CacheConfig):
        raise TypeError(f"cache_config must be a flexkv CacheConfig, got {type(cache_config).__name__}")
    model_config.validate()
    cache_config.validate()
    resolved = cache_config.resolved(model_config)
    if model_config.dp_size != 1 and not server:
        raise FlexKVError("model_config.dp_size > 1 needs FlexKV's server mode: the data-parallel ranks share one "
                          "cache through `flexkv serve` (KVManager becomes its client by itself)")
    if resolved.enable_remote and not server:
        remote_settings(resolved)  # a ConfigError naming the key, before anything is allocated (the server's
        # plane checks its own when it opens: its clients need no S3 or Redis settings)
    if resolved.num_cpu_blocks > _MAX_BLOCKS:
        raise ConfigError(f"cache_config.num_cpu_blocks = {resolved.num_cpu_blocks} exceeds {_MAX_BLOCKS}, the "
                          "most one tier can index; use larger blocks (tokens_per_block) or fewer of them",
                          "cache_config.num_cpu_blocks")
    return resolved


def plane_options(model_config: ModelConfig, cache_config: CacheConfig, *, num_copy_threads: int = 2,
                  ssd_io_engine: str = "auto", ssd_env: Any = None) -> dict[str, Any]:
    """The control plane's options for a resolved cache config (block counts, not GiB)."""
    c = cache_config
    return {
        "model_fingerprint": model_config.fingerprint(),
        "block_bytes": model_config.block_bytes(c.tokens_per_block),
        "num_layers": model_config.num_layers,
        "tokens_per_block": c.tokens_per_block,
        "num_cpu_blocks": c.num_cpu_blocks,
        "evict_ratio": float(c.evict_ratio),
        "use_hugepage_cpu_buffer": c.use_hugepage_cpu_buffer,
        "enable_ssd": c.enable_ssd,
        "num_ssd_blocks": c.num_ssd_blocks,
        "ssd_cache_dirs": c.ssd_cache_dirs,
        "ssd_cache_iouring_entries": c.ssd_cache_iouring_entries,
        "ssd_io_engine": ssd_io_engine,
        "ssd_env": ssd_env,
        "use_ce_transfer_h2d": c.use_ce_transfer_h2d,
        "use_ce_transfer_d2h": c.use_ce_transfer_d2h,
        "transfer_sms_h2d": c.transfer_sms_h2d,
        "transfer_sms_d2h": c.transfer_sms_d2h,
        "num_copy_threads": num_copy_threads,
        "progress_interval_s": progress_interval_s(),
    }


def open_control_plane(model_config: ModelConfig, cache_config: CacheConfig, **kwargs: Any) -> Any:
    """Checks that the tiers fit this machine (a ConfigError naming the key that does not), then opens a
    control plane. ``cache_config`` must be resolved (``cache_config.resolved(model_config)``)."""
    require_resources(cache_config, model_config)
    plane = ControlPlane(plane_options(model_config, cache_config, **kwargs))
    if cache_config.enable_remote:
        try:
            _REMOTE[plane] = RemoteTier(plane, remote_settings(cache_config)).start()
        except BaseException:
            plane.shutdown()
            raise
    _OPEN.add(plane)
    return plane


def remote_tier_of(plane: Any) -> RemoteTier | None:
    """The remote tier of a plane opened by open_control_plane, or None."""
    try:
        return _REMOTE.get(plane)
    except TypeError:  # a client of a server: not a key of the table
        return None


def shutdown_plane(plane: Any) -> None:
    """Shuts a plane down: its remote tier first (queued write-throughs finish, bounded), then the plane."""
    tier = remote_tier_of(plane)
    if tier is not None:
        _REMOTE.pop(plane, None)
        try:
            tier.shutdown()
        except Exception:  # the plane must still shut down
            logger.exception("FlexKV: shutting the remote tier down failed")
    plane.shutdown()


__all__ = ["ControlPlane", "FaultInjectingIoEnv", "checked_config", "open_control_plane", "plane_options",
           "remote_tier_of", "shutdown_plane"]
