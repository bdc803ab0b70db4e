"""KVManagers of this process by the port their workers register KV memory at (``gpu_register_port``).

An engine whose workers run in the control plane's own process (SGLang with one TP rank) hands its KV
memory to the manager through this registry instead of a socket.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_LOCK = threading.Lock()
_MANAGERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register_manager(port: str, manager: Any) -> None:
    """Makes ``manager`` the one listening on ``port`` in this process."""
    with _LOCK:
        current = _MANAGERS.get(port)
        if current is not None and current is not manager:
            raise RuntimeError(f"gpu_register_port {port!r} is already used by another KVManager in this process; "
                               "give each FlexKV instance its own server_recv_port")
        _MANAGERS[port] = manager


def unregister_manager(port: str, manager: Any) -> None:
    with _LOCK:
        if _MANAGERS.get(port) is manager:
            del _MANAGERS[port]


def manager_for(port: str) -> Any:
    """The KVManager listening on ``port`` in this process, or None."""
    with _LOCK:
        return _MANAGERS.get(port)


def manager_with_model(model_config: Any) -> Any:
    """The registered KVManager built on this very model_config object, or None."""
    with _LOCK:
        for manager in _MANAGERS.values():
            if getattr(manager, "model_config", None) is model_config:
                return manager
    return None
