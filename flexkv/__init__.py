"""FlexKV: KV-cache offloading for LLM inference engines.

The public names; the implementation lives in ``flexkv.core``.
"""

from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig
from flexkv.core.config_file import load_config
from flexkv.core.kv_manager import KVManager
from flexkv.core.layout import EngineLayout, KVCacheLayout, KVCacheLayoutType
from flexkv.core.request import KVResponse, KVResponseStatus

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "EngineLayout",
    "FlexKVConfig",
    "KVCacheLayout",
    "KVCacheLayoutType",
    "KVManager",
    "KVResponse",
    "KVResponseStatus",
    "ModelConfig",
    "load_config",
]
