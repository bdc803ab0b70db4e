"""``flexkv.common.storage``: KV cache layout descriptions."""

from flexkv.core.layout import EngineLayout, KVCacheLayout, KVCacheLayoutType

__all__ = ["EngineLayout", "KVCacheLayout", "KVCacheLayoutType"]
