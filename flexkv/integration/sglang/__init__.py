"""``flexkv.integration.sglang``: the original FlexKV's SGLang module path, naming what FlexKV has for SGLang.

``KVTPClient`` and ``FlexKVConfig`` (what SGLang's ``--enable-flexkv`` imports) and ``FlexKVHiCacheStorage``
(HiCache's storage backend; imported on first use, it needs SGLang). The original's own SGLang connector
(``flexkv.integration.sglang.connector.FlexKVConnector``, for its SGLang patch) has no counterpart here: see
docs/migrating.md.
"""

from __future__ import annotations

from typing import Any

from flexkv.adapters.sglang.flexkv_config import FlexKVConfig
from flexkv.adapters.sglang.tp_client import KVTPClient

__all__ = ["FlexKVConfig", "FlexKVHiCacheStorage", "KVTPClient"]


def __getattr__(name: str) -> Any:
    if name == "FlexKVHiCacheStorage":
        from flexkv.adapters.sglang import FlexKVHiCacheStorage

        return FlexKVHiCacheStorage
    raise AttributeError(name)
