"""The server's endpoint (``server_recv_port``): which addresses are allowed, and the lock that makes one server
per endpoint.

``ipc://PATH`` is the default: the socket file and its lock file ``PATH.lock`` are created owner-only, so only
the user who runs the server can connect. ``tcp://HOST:PORT`` is served only with an explicit address (not
``*`` or ``0.0.0.0``) and a ``server_token``: anyone who can reach the port could otherwise read and write the
cache. A second server on the same ipc path finds the lock held and stops with the first one's pid; a lock left
by a killed server is free again (the kernel drops it with the process), so a stale socket file is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass

from .errors import ConfigError

_ANY_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
_IPC_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


@dataclass(frozen=True)
class Endpoint:
    address: str  # as ZeroMQ takes it
    scheme: str  # "ipc" or "tcp"
    path: str = ""  # the socket file of an ipc endpoint

    @property
    def lock_path(self) -> str:
        return self.path + ".lock" if self.scheme == "ipc" else ""


def parse_endpoint(address: str, token: str = "", *, serving: bool = False) -> Endpoint:
    """Checks ``server_recv_port``. ``serving``: the server's side, where a tcp:// address must be explicit and
    come with a token (a client may name the server's host however it reaches it)."""
    key = "server_recv_port"
    if not isinstance(address, str) or "://" not in address:
        raise ConfigError(f"{key} = {address!r} is not a ZeroMQ endpoint; use e.g. \"ipc:///tmp/flexkv_server\"", key)
    scheme, rest = address.split("://", 1)
    if scheme == "ipc":
        if not rest.startswith("/"):
            raise ConfigError(f"{key} = {address!r}: an ipc:// endpoint needs an absolute path "
                              "(ipc:///tmp/flexkv_server)", key)
        if len(rest.encode()) > _IPC_PATH_MAX:
            raise ConfigError(f"{key} = {address!r}: the socket path is longer than {_IPC_PATH_MAX} bytes, the most a "
                              "unix socket allows; use a shorter path", key)
        return Endpoint(address, "ipc", rest)
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"{key} = {address!r}: a tcp:// endpoint is tcp://HOST:PORT", key)
        if serving and host in _ANY_HOSTS:
            raise ConfigError(f"{key} = {address!r}: FlexKV serves tcp:// only on an explicit address, not on every "
                              "interface; name the one the clients use (tcp://10.0.0.5:5555)", key)
        if serving and not token:
            raise ConfigError(f"{key} = {address!r}: a tcp:// server needs server_token (or FLEXKV_SERVER_TOKEN) so "
                              "that only your clients can use the cache; or use an ipc:// endpoint", "server_token")
        return Endpoint(address, "tcp")
    raise ConfigError(f"{key} = {address!r}: FlexKV serves ipc:// and tcp:// endpoints only", key)


class EndpointLock:
    """Holds ``PATH.lock`` (flock) while a server serves an ipc endpoint; removes both files on release."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._fd = -1

    def acquire(self) -> None:
        if self.endpoint.scheme != "ipc":
            return
        path = self.endpoint.lock_path
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"another FlexKV server (pid {holder}) serves {self.endpoint.address}; stop it, or "
                                  "give this one another server_recv_port", "server_recv_port") from None
            raise
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # A socket file here belongs to a server that died without removing it: nobody holds the lock.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.endpoint.path)

    def secure_socket(self) -> None:
        """After bind: the socket file is the owner's alone (ZeroMQ creates it with the umask's bits)."""
        if self.endpoint.scheme == "ipc":
            os.chmod(self.endpoint.path, 0o600)

    def release(self) -> None:
        if self._fd < 0:
            return
        for path in (self.endpoint.path, self.endpoint.lock_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(self._fd)  # the lock goes with the descriptor
        self._fd = -1


@contextlib.contextmanager
def private_umask():
    """Files created inside are owner-only (the ipc socket between bind and chmod)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
