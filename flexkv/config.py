"""``flexkv.config``: the config model and loader (implemented in ``flexkv.core.config`` and ``.config_file``)."""

from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig
from flexkv.core.config_file import load_config

__all__ = ["CacheConfig", "FlexKVConfig", "ModelConfig", "load_config"]
