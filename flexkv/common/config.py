"""``flexkv.common.config``: the module path engines' FlexKV hooks import the configs from.

``GLOBAL_CONFIG_FROM_ENV`` is the original FlexKV's namespace of its environment settings, here read-only
information built on first use: the server keys as FlexKV reads them (config file, then ``FLEXKV_*``) and the
original's defaults of its keys that have no effect here. Changing it changes nothing: set the config file's
keys or the ``FLEXKV_*`` variables instead.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from flexkv.core.config import CacheConfig, FlexKVConfig, ModelConfig
from flexkv.core.config_file import load_config

__all__ = ["CacheConfig", "FlexKVConfig", "ModelConfig", "load_config"]

_GLOBAL: Namespace | None = None


def __getattr__(name: str) -> Any:
    global _GLOBAL
    if name != "GLOBAL_CONFIG_FROM_ENV":
        raise AttributeError(name)
    if _GLOBAL is None:
        from flexkv.core.server_launch import ServerSettings
        from flexkv.core.upstream import NO_EFFECT

        values = {key: spec.default for key, spec in NO_EFFECT.items()}
        settings = ServerSettings.from_env()
        values.update({key: getattr(settings, key) for key in ServerSettings.__dataclass_fields__})
        _GLOBAL = Namespace(**values)
    return _GLOBAL
