"""``flexkv.config``: the config model and loader (implementation in ``flexkv.core.config``)."""

from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig, load_config

__all__ = ["CacheConfig", "FlexKVConfig", "ModelConfig", "load_config"]
