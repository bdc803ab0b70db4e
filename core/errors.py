"""Exceptions FlexKV raises on purpose. Each message names the cause and the fix."""

from __future__ import annotations


class FlexKVError(Exception):
    """Base class of every error FlexKV raises on purpose."""


class ConfigError(FlexKVError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or does not fit this machine.

    ``key`` is the offending key as a dotted path (``cache_config.evict_ratio``), or None when
    the problem is not about one key (a missing or unreadable file).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class LayoutError(FlexKVError, ValueError):
    """Registered KV memory does not match its description or the model config."""


class TaskError(FlexKVError, ValueError):
    """A task call got bad arguments (token arrays, masks, slot mappings) or came at the wrong time."""
