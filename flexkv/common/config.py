"""``flexkv.common.config``: the module path engines' FlexKV hooks import the configs from."""

from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig
from flexkv.core.config_file import load_config

__all__ = ["CacheConfig", "FlexKVConfig", "ModelConfig", "load_config"]
