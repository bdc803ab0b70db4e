"""``flexkv.kvmanager``: the module path engines' FlexKV hooks import KVManager from."""

from flexkv.core.kv_manager import KVManager

__all__ = ["KVManager"]
