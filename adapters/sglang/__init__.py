"""FlexKV for SGLang (0.5.16 and later; tested with 0.5.23).

Two ways in:

- ``--enable-flexkv --flexkv-config-file cfg.json``: SGLang's built-in FlexKV radix cache imports
  ``flexkv.kvmanager.KVManager``, ``flexkv.integration.config.FlexKVConfig``,
  ``flexkv.server.client.KVTPClient`` and friends (this package's ``flexkv/`` re-exports them).
- HiCache's storage backend: ``--hicache-storage-backend dynamic --hicache-storage-backend-extra-config
  '{"backend_name":"flexkv","module_path":"flexkv.adapters.sglang","class_name":"FlexKVHiCacheStorage",
  "interface_v1":1}'``.

SGLang is imported only when the HiCache backend class is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FlexKVHiCacheStorage"]


def __getattr__(name: str) -> Any:
    if name == "FlexKVHiCacheStorage":  # subclasses SGLang's HiCacheStorage: needs SGLang
        from .hicache_storage import FlexKVHiCacheStorage

        return FlexKVHiCacheStorage
    raise AttributeError(name)
