"""``${NAME}`` in config strings: the value of the environment variable NAME.

The manual's per-worker config writes ``"server_recv_port": "ipc:///tmp/flexkv_${worker_id}_test"``: each
worker process starts with its own ``worker_id`` in the environment and one file serves them all. Every
string value of a config file (at any depth: lists, ``remote_config_custom``) is expanded when the file is
read; keys are not. ``$${`` writes a literal ``${``. A variable that is unset, or a ``${`` that does not
close with a name, is a :class:`ConfigError` naming the key and the variable: a path is never taken
literally with ``${...}`` in it. ``FLEXKV_<KEY>`` overrides are not expanded (the shell that set them did).
The C++ reader (csrc/api/config_reader.cc) follows the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_string(value: str, env: Mapping[str, str], key: str) -> str:
    """``value`` with each ``${NAME}`` replaced by ``env[NAME]`` and each ``$${`` by ``${``."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if not m.group(0).endswith("}") or not _NAME.fullmatch(name):
            raise ConfigError(f"{key}: {value!r} has {m.group(0)!r}, which is not a ${{NAME}} reference; write "
                              "${NAME} with NAME a variable name (letters, digits, _), or $${ for a literal ${", key)
        if name not in env:
            raise ConfigError(f"{key}: {value!r} refers to ${{{name}}}, but the environment variable {name} is not "
                              f"set; set it in each process's environment (export {name}=0), or write the value "
                              "without ${...}", key)
        return env[name]

    return _REF.sub(one, value) if "${" in value else value


def expand_env_refs(data: Any, env: Mapping[str, str], key: str = "") -> Any:
    """A copy of parsed config data with every string value expanded; ``key`` is the dotted path of ``data``."""
    if isinstance(data, str):
        return expand_string(data, env, key or "config")
    if isinstance(data, dict):
        return {k: expand_env_refs(v, env, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env_refs(v, env, f"{key}[{i}]") for i, v in enumerate(data)]
    return data


__all__ = ["expand_env_refs", "expand_string"]
