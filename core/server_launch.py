"""Where a KVManager finds its control plane: in its own process, or at a ``flexkv serve`` it may start.

FlexKV's rules: a manager is a client of the server at ``server_recv_port`` when ``server_client_mode`` is on,
``model_config.dp_size > 1`` or ``instance_num > 1``. With ``server_launch_mode`` "embedded" the manager of
instance 0, data-parallel rank 0 starts the server as its child process (which ends with it); "external"
means you run ``flexkv serve --config ...`` yourself (a systemd unit, say), and it outlives the engines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from .config import CacheConfig, FlexKVConfig, ModelConfig
from .config_file import load_config
from .errors import FlexKVError
from .remote_plane import RemotePlane
from .wire import ServerError, ServerUnavailable

logger = logging.getLogger("flexkv")

_RUN_SERVE = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
              "runpy.run_module('flexkv.core.serve_cmd', run_name='__main__')")
_STARTUP_S = 120.0  # how long a client waits for a server to come up (an SSD tier is preallocated first)


@dataclass(frozen=True)
class ServerSettings:
    """The config file's server keys (after ``FLEXKV_*`` overrides)."""

    server_recv_port: str = "ipc:///tmp/flexkv_server"
    server_client_mode: bool = False
    server_launch_mode: str = "embedded"
    instance_num: int = 1
    instance_id: int = 0
    server_token: str = ""
    server_lease_seconds: float = 10.0
    server_timeout_seconds: float = 0.5
    metrics_port: int = 0
    num_log_interval_requests: int = 200
    log_interval_seconds: float = 0.0

    @classmethod
    def of(cls, config: FlexKVConfig) -> ServerSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})

    @classmethod
    def from_env(cls, env: Any = None) -> ServerSettings:
        """From ``FLEXKV_CONFIG_PATH`` (if set) and the ``FLEXKV_*`` overrides, as the engines' adapters read."""
        return cls.of(load_config(None, env=env))

    def client_mode(self, model_config: ModelConfig) -> bool:
        return self.server_client_mode or model_config.dp_size > 1 or self.instance_num > 1


def client_instance(settings: ServerSettings, model_config: ModelConfig, dp_client_id: int) -> int:
    """The client's engine-instance number on the server: ``instance_id * dp_size + dp_client_id``."""
    if not 0 <= dp_client_id < model_config.dp_size:
        raise FlexKVError(f"dp_client_id = {dp_client_id} is outside model_config.dp_size = {model_config.dp_size}")
    if settings.instance_id >= settings.instance_num:
        raise FlexKVError(f"instance_id = {settings.instance_id} must be below instance_num = {settings.instance_num}")
    return settings.instance_id * model_config.dp_size + dp_client_id


def start_embedded_server(model_config: ModelConfig, cache_config: CacheConfig,
                          settings: ServerSettings) -> subprocess.Popen:
    """``flexkv serve`` as a child of this process: it gets SIGTERM when this process ends (however it ends),
    and then stops cleanly. The config goes through an owner-only file the child removes once read."""
    model = {k: v for k, v in asdict(model_config).items()}
    model["dtype"] = model_config.dtype_name
    config = {**asdict(settings), "cache_config": asdict(cache_config), "model_config": model}
    fd, path = tempfile.mkstemp(prefix="flexkv-serve-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    # The child imports the flexkv this process runs, never a ``flexkv/`` folder in the working directory (a
    # source checkout): `python -m` would put the working directory first on its path.
    cmd = [sys.executable, "-c", _RUN_SERVE, "--config", path, "--remove-config", "--parent-pid", str(os.getpid())]
    logger.warning("FlexKV: starting the embedded server at %s", settings.server_recv_port)
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=False)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def open_client_plane(model_config: ModelConfig, cache_config: CacheConfig, settings: ServerSettings,
                      dp_client_id: int, what: str) -> tuple[RemotePlane, subprocess.Popen | None]:
    """A client of the server at ``settings.server_recv_port``, and the embedded server this process started
    for it (None if it found one answering, or the server is external)."""
    instance = client_instance(settings, model_config, dp_client_id)
    tpb = cache_config.tokens_per_block
    kw = {"fingerprint": model_config.fingerprint(), "tokens_per_block": tpb,
          "block_bytes": model_config.block_bytes(tpb), "instance": instance, "what": what}
    if settings.server_launch_mode == "embedded" and instance == 0:
        try:
            return connect_once(settings, **kw), None  # a server already answers there (another engine's)
        except ServerUnavailable:
            pass
        child = start_embedded_server(model_config, cache_config, settings)
        try:
            return connect_when_up(settings, child, **kw), child
        except BaseException:
            stop_embedded_server(child)
            raise
    return connect_when_up(settings, None, **kw), None


def stop_embedded_server(child: subprocess.Popen | None) -> None:
    """SIGTERM to an embedded server, and a wait for its clean stop (SIGKILL after 30 s)."""
    if child is None or child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(30)
    except subprocess.TimeoutExpired:
        logger.error("FlexKV: the embedded server did not stop within 30 s of SIGTERM; killing it")
        child.kill()
        child.wait()


def connect_once(settings: ServerSettings, **kw: Any) -> RemotePlane:
    return RemotePlane(settings.server_recv_port, token=settings.server_token,
                       timeout_s=settings.server_timeout_seconds, **kw)


def connect_when_up(settings: ServerSettings, child: subprocess.Popen | None, *, fingerprint: str,
                    tokens_per_block: int, block_bytes: int, instance: int, what: str) -> RemotePlane:
    """A RemotePlane once the server answers: waits up to two minutes for it to start, logging every 10 s; a
    child that exited stops the wait with its exit status."""
    deadline = time.monotonic() + _STARTUP_S
    next_log = time.monotonic() + 10
    while True:
        try:
            return connect_once(settings, fingerprint=fingerprint, tokens_per_block=tokens_per_block,
                                block_bytes=block_bytes, instance=instance, what=what)
        except (ServerUnavailable, ServerError) as e:
            if isinstance(e, ServerError) and e.kind != "session":
                raise
            err: Exception = e
        if child is not None and child.poll() is not None:
            raise FlexKVError(f"the embedded FlexKV server exited with status {child.returncode} before it answered "
                              f"at {settings.server_recv_port}; its log above says why")
        now = time.monotonic()
        if now > deadline:
            raise FlexKVError(f"no FlexKV server answered at {settings.server_recv_port} within {_STARTUP_S:g} s "
                              f"({err}); start it with `flexkv serve --config ...` or set server_launch_mode to "
                              "\"embedded\"")
        if now > next_log:
            logger.warning("FlexKV: waiting for the server at %s", settings.server_recv_port)
            next_log = now + 10
        time.sleep(0.1)
