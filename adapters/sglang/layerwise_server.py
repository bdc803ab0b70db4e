"""SGLang's layer-wise loading (``FLEXKV_ENABLE_LAYERWISE_TRANSFER=1``): FlexKV's end of the eventfd handshake.

SGLang's connector connects to a unix socket (``build_layerwise_eventfd_socket_path``), sends
``struct("iiii")`` = (TP rank on the node, TP size on the node, layers, counters), then per counter a
message ``struct("i")`` = counter id carrying one eventfd per layer (SCM_RIGHTS), and waits for one byte
0x01. During the forward pass SGLang's KV pool reads layer i's eventfd of the load's counter before it
uses layer i. After every ``launch(..., layerwise_transfer=True, counter_id=c)``, this server writes 1 to
counter c's eventfd of each layer once that layer is in the engine's memory (per layer on the GPU data
plane, all at once on the host copy path).

With one rank the KVManager's launches feed the server (``serve_layerwise``). With tensor parallelism every
rank process has its own server (the socket path carries the process id) fed by its own ``RankAgent``
(``serve_rank_layerwise``): a rank's layers are released when that rank's slice of them has arrived.
"""

from __future__ import annotations

import array
import logging
import os
import queue
import socket
import struct
import threading
from typing import Any

from flexkv.core import TaskError

logger = logging.getLogger("flexkv")

_SERVERS: dict[str, LayerwiseEventServer] = {}
_SERVERS_LOCK = threading.Lock()
_ACK = b"\x01"


class LayerwiseEventServer:
    def __init__(self, path: str, num_layers: int, manager: Any = None) -> None:
        self.path = path
        self.manager = manager  # None: a rank agent calls signal() itself
        self.source: Any = manager
        self.num_layers = int(num_layers)
        self._fds: dict[int, dict[int, list[int]]] = {}  # TP rank -> counter id -> one eventfd per layer
        self._lock = threading.Lock()
        self._launches: queue.Queue[tuple[list[int], int] | None] = queue.Queue()
        if os.path.exists(path):
            os.unlink(path)  # left by an earlier process with the same pid
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        os.chmod(path, 0o600)  # only this user's SGLang hands its eventfds over
        self._sock.listen(8)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="flexkv-layerwise-accept", daemon=True).start()
        if manager is not None:
            threading.Thread(target=self._signal_loop, name="flexkv-layerwise-signal", daemon=True).start()
            manager.add_launch_listener(self._on_launch)

    # --------------------------------------------------------------------------------- handshake

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            try:
                with conn:
                    self._handshake(conn)
            except Exception:
                logger.exception("FlexKV layer-wise handshake failed")

    def _handshake(self, conn: socket.socket) -> None:
        tp_rank, _tp_size, num_layers, num_counters = struct.unpack("iiii", _recv_exact(conn, 16))
        if num_layers != self.num_layers:
            conn.sendall(b"\x00")
            raise ValueError(f"SGLang sent {num_layers} layers, FlexKV's model has {self.num_layers}")
        counters: dict[int, list[int]] = {}
        fd_bytes = socket.CMSG_LEN(num_layers * array.array("i").itemsize)
        for _ in range(num_counters):
            data, ancdata, _, _ = conn.recvmsg(4, fd_bytes)
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if len(data) != 4 or len(fds) != num_layers:
                conn.sendall(b"\x00")
                raise ValueError(f"a counter message carried {len(fds)} eventfds for {num_layers} layers")
            counters[struct.unpack("i", data)[0]] = list(fds)
        with self._lock:
            for old in self._fds.pop(tp_rank, {}).values():
                _close_all(old)
            self._fds[tp_rank] = counters
        conn.sendall(_ACK)
        logger.info("FlexKV layer-wise: TP rank %d registered %d counters x %d layers", tp_rank, num_counters,
                    num_layers)

    # -------------------------------------------------------------------------------- signalling

    def _on_launch(self, task_ids: list[int], layerwise: bool, counter_id: int) -> None:
        if layerwise:
            self._launches.put((list(task_ids), counter_id))

    def _signal_loop(self) -> None:
        while True:
            item = self._launches.get()
            if item is None:
                return
            task_ids, counter = item
            for layer in range(self.num_layers):
                for task in task_ids:
                    try:
                        arrived = self.manager.wait_layer(task, layer, timeout=120.0)
                    except TaskError:  # already reported to (and forgotten by) the engine: it has ended
                        arrived = True
                    if not arrived:
                        logger.error("FlexKV layer-wise: layer %d of task %d did not arrive; SGLang is released "
                                     "anyway and computes on what is there", layer, task)
                self.signal(counter, layer)

    def signal(self, counter: int, layer: int) -> None:
        """Releases ``layer`` of ``counter`` on every rank that handed this server its eventfds."""
        if self._closed:
            return
        with self._lock:
            fds = [counters[counter][layer] for counters in self._fds.values() if counter in counters]
        for fd in fds:
            try:
                os.eventfd_write(fd, 1)
            except OSError as e:
                logger.warning("FlexKV layer-wise: cannot signal layer %d of counter %d: %s", layer, counter, e)

    def close(self) -> None:
        self._closed = True
        self._launches.put(None)
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        with self._lock:
            for counters in self._fds.values():
                for fds in counters.values():
                    _close_all(fds)
            self._fds.clear()


def serve_layerwise(path: str, manager: Any) -> LayerwiseEventServer:
    """The server at ``path`` for ``manager``'s launches (one rank), started on first use."""
    return _serve(path, manager, lambda: LayerwiseEventServer(path, manager.model_config.num_layers, manager))


def serve_rank_layerwise(path: str, agent: Any) -> LayerwiseEventServer:
    """The server at ``path`` for this rank process's ``RankAgent``: it signals as the rank's copies land."""

    def make() -> LayerwiseEventServer:
        server = LayerwiseEventServer(path, agent.model["num_layers"])
        server.source = agent
        agent.add_layer_listener(server.signal)
        return server

    return _serve(path, agent, make)


def _serve(path: str, source: Any, make: Any) -> LayerwiseEventServer:
    with _SERVERS_LOCK:
        server = _SERVERS.get(path)
        if server is None or server.source is not source:
            if server is not None:
                server.close()
            server = make()
            _SERVERS[path] = server
        return server


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise ConnectionError("SGLang closed the layer-wise socket during the handshake")
        out += chunk
    return out


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
