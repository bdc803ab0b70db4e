"""Reading FlexKV config files and the environment into a :class:`FlexKVConfig`.

One JSON (or YAML) file drives every engine. Two layouts are accepted and may be mixed:

* the manual's long form: top-level ``server_recv_port``, ``cache_config: {...}``, optional
  ``model_config: {...}``, ``enable_flexkv``, ``num_log_interval_requests``;
* the short form: top-level ``cpu_cache_gb``, ``ssd_cache_gb``, ``ssd_cache_dir`` (sizes in GiB,
  turned into block counts by :meth:`CacheConfig.resolved` once the model shape is known).

``//`` line comments and ``/* */`` comments are accepted in JSON (people copy them from the manual).
``${NAME}`` in a string value is the environment variable NAME (env_refs.py; unset is an error).
After the file, ``FLEXKV_<KEY>`` environment variables override single keys. Every mistake is a
:class:`ConfigError` naming the key, the value and what would work; an unknown key gets a did-you-mean.
The keys, their sections and the reserved ``FLEXKV_*`` names come from ``config_keys.json``; the C++ reader
(``flexkv::CacheOptions::from_file``) follows the same rules for JSON (YAML is read here only).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import (
    _SIZE_PAIRS,
    _TOP_SCALARS,
    CacheConfig,
    FlexKVConfig,
    ModelConfig,
    _both_sizes_error,
    _check_type,
    _describe_value,
    _field_types,
    _union_args,
)
from .config_keys import RESERVED_ENV_NAMES, SHORT_FORM_KEYS, section_keys
from .config_keys import RESERVED_ENV_PREFIXES as _FILE_ENV_PREFIXES
from .env_refs import expand_env_refs
from .errors import ConfigError
from .upstream import UPSTREAM_ENV, UPSTREAM_KEYS, UPSTREAM_SECTIONS, warn_no_effect

logger = logging.getLogger("flexkv")

# Environment variables starting with FLEXKV_ that are not config keys and must not be warned about
# (config_keys.json's reserved_env). Other modules may add their own names here (at import time) before
# load_config runs; the C++ reader knows the file's names only.
RESERVED_ENV_VARS: set[str] = set(RESERVED_ENV_NAMES)
RESERVED_ENV_PREFIXES: tuple[str, ...] = _FILE_ENV_PREFIXES

# ---------------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------------

# The CPU tier when nothing sizes it (no config file, no FLEXKV_CPU_CACHE_GB / FLEXKV_NUM_CPU_BLOCKS): the
# original FlexKV's default, so an engine started without a config runs instead of asking for 1000000 blocks.
DEFAULT_CPU_CACHE_GB = 16.0
_logged_no_config = False


def _log_no_config_once() -> None:
    global _logged_no_config
    if not _logged_no_config:
        _logged_no_config = True
        logger.warning("FlexKV: no config file found (FLEXKV_CONFIG_PATH is unset); using the defaults with a "
                       "%g GiB CPU tier. Set FLEXKV_CONFIG_PATH to a config file, or FLEXKV_CPU_CACHE_GB to size "
                       "the CPU tier", DEFAULT_CPU_CACHE_GB)

_TOP_KEYS = tuple(section_keys("top_level"))
_SHORT_KEYS = SHORT_FORM_KEYS


def _cache_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(CacheConfig)]


def _model_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def resolve_config_path(path: str | os.PathLike[str] | None = None,
                        env: Mapping[str, str] | None = None) -> Path | None:
    """The file load_config reads: ``path``, else ``FLEXKV_CONFIG_PATH``, else None (defaults)."""
    if path is not None:
        return Path(path)
    env = os.environ if env is None else env
    value = env.get("FLEXKV_CONFIG_PATH", "").strip()
    return Path(value) if value else None


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None) -> FlexKVConfig:
    """Load and validate a config file, then apply ``FLEXKV_<KEY>`` environment overrides.

    ``path`` None means ``FLEXKV_CONFIG_PATH`` from ``env`` (default ``os.environ``); if that is unset
    too, the defaults. GiB sizes are kept as given; ``config.resolved_cache(model)`` gives block counts.
    """
    env = os.environ if env is None else env
    from_env = path is None
    file = resolve_config_path(path, env)
    raw: dict[str, Any] = {}
    where = "defaults"
    if file is not None:
        where = str(file)
        raw = _read_file(file, "FLEXKV_CONFIG_PATH" if from_env else None)
        try:
            raw = expand_env_refs(raw, env)  # ${NAME} in string values (env_refs.py)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}", err.key) from None
    top, cache, model, sources = _split_layout(raw, where)
    _apply_env(top, cache, sources, env)
    if file is None and not any(k in cache for k in ("num_cpu_blocks", "cpu_cache_gb")):
        cache["cpu_cache_gb"] = DEFAULT_CPU_CACHE_GB
        _log_no_config_once()
    try:
        config = FlexKVConfig(
            cache_config=CacheConfig(**cache),
            model_config=ModelConfig(**model) if model is not None else None,
            **top,
        )
        config.validate()
    except ConfigError as err:
        source = sources.get(err.key or "")
        message = str(err) + (f" (set by {source})" if source else "")
        raise ConfigError(f"{where}: {message}", err.key) from None
    return config


def upstream_keys_in(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
                     ) -> list[tuple[str, str]]:
    """The original FlexKV's keys a config (the file load_config reads, and ``env``) uses: (where, key) pairs,
    ``where`` being the section or the environment variable."""
    env = os.environ if env is None else env
    file = resolve_config_path(path, env)
    found: list[tuple[str, str]] = []
    if file is not None:
        raw = _rename_upstream_sections(_read_file(file, None), str(file))
        for key in raw:
            if key in UPSTREAM_KEYS and key not in _TOP_KEYS and key not in _SHORT_KEYS:
                found.append(("top level", key))
        for section, native in (("cache_config", _cache_keys()), ("model_config", _model_keys())):
            block = raw.get(section)
            if isinstance(block, dict):
                found.extend((section, k) for k in block if k in UPSTREAM_KEYS and k not in native)
    for var in sorted(env):
        if var in UPSTREAM_ENV and var not in _env_fields() and var not in RESERVED_ENV_VARS:
            found.append((var, UPSTREAM_ENV[var]))
    return found


def _read_file(file: Path, via: str | None) -> dict[str, Any]:
    named = f"config file {str(file)!r}" + (f" (from {via})" if via else "")
    if not file.exists():
        raise ConfigError(f"{named} does not exist; check the path, or unset {via or 'FLEXKV_CONFIG_PATH'} "
                          "to run with the defaults")
    if file.is_dir():
        raise ConfigError(f"{named} is a directory; give the path of a .json or .yaml file inside it")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{named} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{named} cannot be read: {err.strerror or err}") from None
    suffix = file.suffix.lower()
    if suffix == ".json":
        data = _parse_json(text, named)
    elif suffix in (".yaml", ".yml"):
        data = _parse_yaml(text, named)
    else:
        try:
            data = _parse_json(text, named)
        except ConfigError as json_err:
            try:
                data = _parse_yaml(text, named)
            except ConfigError as yaml_err:
                raise ConfigError(f"{named} is neither JSON nor YAML.\n  as JSON: {json_err}\n  as YAML: {yaml_err}"
                                  ) from None
    if not isinstance(data, dict):
        shown = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{named} is {shown}; it must hold an object such as "
                          "{\"cache_config\": {\"num_cpu_blocks\": 50000}}")
    return data


def strip_json_comments(text: str) -> str:
    """Blank out ``//`` and ``/* */`` comments outside JSON strings; lines and columns stay where they were."""
    out = list(text)
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
            continue
        if c == '"':
            in_string = True
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            for j in range(i, end):
                out[j] = " "
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for j in range(i, end):
                if out[j] != "\n":
                    out[j] = " "
            i = end
        else:
            i += 1
    return "".join(out)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for k, v in pairs:
        if k in result:
            raise ConfigError(f"key {k!r} is given twice; keep one", k)
        result[k] = v
    return result


def _parse_json(text: str, named: str) -> Any:
    cleaned = strip_json_comments(text)
    try:
        return json.loads(cleaned, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        hint = ""
        before = cleaned[: err.pos].rstrip()
        if before.endswith(",") and cleaned[err.pos: err.pos + 1] in ("}", "]"):
            hint = " (a trailing comma before a closing bracket: JSON does not allow one, remove it)"
        raise ConfigError(f"{named} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}{hint}"
                          ) from None
    except ConfigError as err:
        raise ConfigError(f"{named}: {err}", err.key) from None


def _parse_yaml(text: str, named: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{named} is not valid YAML: {where}{err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{named} is not valid YAML: {err}") from None


def _unknown_key(path: str, key: str, valid: list[str], elsewhere: dict[str, str], where: str) -> ConfigError:
    """An unknown-key error with a did-you-mean over ``valid`` and the keys that live in other sections."""
    full = f"{path}.{key}" if path else key
    home = elsewhere.get(key)
    if home == "the top level":
        return ConfigError(f"{where}: {full} is not a key here; it belongs at the top level of the file", full)
    if home is not None:
        return ConfigError(f"{where}: {full} is not a key here; it belongs in {home} (move it to {home}.{key})", full)
    candidates = {k: k for k in valid}
    for k, section in elsewhere.items():
        candidates.setdefault(k, k if section == "the top level" else f"{section}.{k}")
    close = difflib.get_close_matches(str(key), list(candidates), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(candidates[c] for c in close)}? " if close else ""
    section = f"in {path}" if path else "at the top level"
    return ConfigError(f"{where}: unknown key {full!r}; {hint}valid keys {section}: {', '.join(valid)}", full)


def _split_layout(raw: dict[str, Any], where: str
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """Check keys and types; return top-level scalars, cache_config values, model_config values, key sources."""
    cache_keys, model_keys = _cache_keys(), _model_keys()
    top_valid = list(_TOP_KEYS) + list(_SHORT_KEYS)
    top: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    model: dict[str, Any] | None = None
    sources: dict[str, str] = {}

    raw = _rename_upstream_sections(raw, where)
    mapped: dict[str, tuple[Any, str]] = {}  # key here -> (value, the original's key naming it)
    ignored: list[str] = []
    for key, value in raw.items():
        if key not in top_valid and key not in ("cache_config", "model_config") and key in UPSTREAM_KEYS:
            _note_upstream(key, value, where, mapped, ignored)
            continue
        if key not in top_valid:
            elsewhere = {k: "cache_config" for k in cache_keys if k not in _SHORT_KEYS}
            elsewhere.update({k: "model_config" for k in model_keys})
            raise _unknown_key("", key, top_valid, elsewhere, where)
        if key in _TOP_SCALARS:
            _check_type_at(FlexKVConfig, key, value, key, where)
            top[key] = value
        elif key in _SHORT_KEYS:
            _check_type_at(CacheConfig, key, value, key, where)
            cache[key] = value
            sources[f"cache_config.{key}"] = f"top-level key {key!r}"

    section = raw.get("cache_config", {})
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: cache_config must be an object ({{...}}), got {_describe_value(section)}",
                          "cache_config")
    for key, value in section.items():
        if key not in cache_keys and key in UPSTREAM_KEYS and UPSTREAM_KEYS[key].section in (None, "cache_config"):
            _note_upstream(key, value, where, mapped, ignored)
            continue
        if key not in cache_keys:
            elsewhere = {k: "model_config" for k in model_keys}
            elsewhere.update({k: "the top level" for k in _TOP_KEYS})
            elsewhere.update({k: u.section for k, u in UPSTREAM_KEYS.items() if u.section and k not in elsewhere
                              and u.section != "cache_config"})
            raise _unknown_key("cache_config", key, cache_keys, elsewhere, where)
        if key in cache:
            raise ConfigError(f"{where}: {key} is given both at the top level and in cache_config; keep one",
                              f"cache_config.{key}")
        _check_type_at(CacheConfig, key, value, f"cache_config.{key}", where)
        cache[key] = value

    if raw.get("model_config") is not None:
        section = raw["model_config"]
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: model_config must be an object ({{...}}), got {_describe_value(section)}",
                              "model_config")
        model = {}
        for key, value in section.items():
            if key not in model_keys and key in UPSTREAM_KEYS and \
                    UPSTREAM_KEYS[key].section in (None, "model_config"):
                _note_upstream(key, value, where, mapped, ignored)
                continue
            if key not in model_keys:
                elsewhere = {k: "cache_config" for k in cache_keys}
                elsewhere.update({k: "the top level" for k in _TOP_KEYS})
                elsewhere.update({k: u.section for k, u in UPSTREAM_KEYS.items() if u.section and k not in elsewhere
                                  and u.section != "model_config"})
                raise _unknown_key("model_config", key, model_keys, elsewhere, where)
            if section_keys("model_config")[key].type == "dtype":
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: model_config.dtype must be a string such as \"bfloat16\", "
                                      f"got {_describe_value(value)}", "model_config.dtype")
            else:
                _check_type_at(ModelConfig, key, value, f"model_config.{key}", where)
            model[key] = value

    for target, (value, original) in mapped.items():
        section_name, _, name = target.partition(".")
        if section_name == "model_config":
            model = {} if model is None else model
        into = cache if section_name == "cache_config" else model
        assert into is not None
        if name in into:
            raise ConfigError(f"{where}: {original} (the original FlexKV's name of {target}) and {target} are both "
                              "given; keep one", target)
        if section_keys(section_name)[name].type == "dtype":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {original} must be a string such as \"bfloat16\", got "
                                  f"{_describe_value(value)}", target)
        else:
            _check_type_at(CacheConfig if section_name == "cache_config" else ModelConfig, name, value, original,
                           where)
        into[name] = value
        if original != name:
            sources[target] = f"the original FlexKV's key {original!r}"
    warn_no_effect(ignored, where)
    for blocks_key, gb_key in _SIZE_PAIRS:
        if blocks_key in cache and cache.get(gb_key) is not None:
            err = _both_sizes_error("cpu" if "cpu" in gb_key else "ssd", blocks_key, gb_key)
            raise ConfigError(f"{where}: {err}", err.key)
    return top, cache, model, sources


def _rename_upstream_sections(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The original's benchmark files name their sections ModelConfig and CacheConfig."""
    out = dict(raw)
    for theirs, ours in UPSTREAM_SECTIONS.items():
        if theirs in out:
            if ours in out:
                raise ConfigError(f"{where}: {theirs} (the original FlexKV's name of {ours}) and {ours} are both "
                                  "given; keep one", ours)
            out[ours] = out.pop(theirs)
    return out


def _note_upstream(key: str, value: Any, where: str, mapped: dict[str, tuple[Any, str]], ignored: list[str]) -> None:
    """An original FlexKV key: remember the value for its key here, or that it has no effect."""
    spec = UPSTREAM_KEYS[key]
    if spec.target is None:
        ignored.append(key)
        return
    converted = spec.convert(value, f"{where}: ")
    if spec.target in mapped and mapped[spec.target][0] != converted:
        raise ConfigError(f"{where}: {key} and {mapped[spec.target][1]} both set {spec.target}, to different "
                          "values; keep one", spec.target)
    mapped[spec.target] = (converted, key)


def _check_type_at(cls: type, name: str, value: Any, key: str, where: str) -> None:
    try:
        _check_type(cls, name, value, key)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}", err.key) from None


# ---------------------------------------------------------------------------------------------
# environment overrides
# ---------------------------------------------------------------------------------------------

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _env_fields() -> dict[str, tuple[type, str]]:
    """``FLEXKV_<KEY>`` -> (dataclass, field name) for every key the environment may override."""
    table = {f"FLEXKV_{name.upper()}": (FlexKVConfig, name) for name in _TOP_SCALARS}
    table.update({f"FLEXKV_{f.name.upper()}": (CacheConfig, f.name) for f in dataclasses.fields(CacheConfig)})
    return table


def env_override_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``FLEXKV_*`` variables in ``env`` that override a config key."""
    env = os.environ if env is None else env
    table = _env_fields()
    return sorted(name for name in env if name in table)


def _parse_env_value(var: str, text: str, tp: Any, key: str) -> Any:
    members = _union_args(tp) or (tp,)
    stripped = text.strip()
    if type(None) in members and stripped.lower() in ("", "none", "null"):
        return None
    errors: list[str] = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            continue
        if member is bool:
            if stripped.lower() in _TRUE:
                return True
            if stripped.lower() in _FALSE:
                return False
            errors.append("true or false (1/0, true/false, yes/no, on/off)")
        elif member is int:
            try:
                return int(stripped)
            except ValueError:
                errors.append("an integer")
        elif member is float:
            try:
                value = float(stripped)
            except ValueError:
                errors.append("a number")
            else:
                if math.isfinite(value):
                    return value
                errors.append("a finite number")
        elif member is str:
            if stripped:
                return stripped
            errors.append("a non-empty string")
        elif origin is list:
            return [p.strip() for p in stripped.split(";") if p.strip()]
        elif origin is dict:
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as err:
                errors.append(f"a JSON object (not valid JSON: {err.msg} at column {err.colno})")
            else:
                if isinstance(value, dict):
                    return value
                errors.append("a JSON object such as '{\"endpoint\": \"s3.amazonaws.com\"}'")
    raise ConfigError(f"environment variable {var}={text!r} is not valid for {key}: expected "
                      f"{' or '.join(dict.fromkeys(errors))}", key)


def _apply_env(top: dict[str, Any], cache: dict[str, Any], sources: dict[str, str], env: Mapping[str, str]) -> None:
    table = _env_fields()
    given: dict[str, Any] = {}
    ignored: list[str] = []
    for var in sorted(env):
        if not var.startswith("FLEXKV_"):
            continue
        if var in RESERVED_ENV_VARS or var.startswith(RESERVED_ENV_PREFIXES):
            continue
        if var not in table and var in UPSTREAM_ENV:
            spec = UPSTREAM_KEYS[UPSTREAM_ENV[var]]
            if spec.target is None:
                ignored.append(spec.name)
                continue
            var_cls = FlexKVConfig if spec.section == "top_level" else CacheConfig
            if spec.section == "model_config":
                ignored.append(spec.name)  # the model shape comes from the engine, never from the environment
                continue
            name = spec.field or ""
            text = env[var]
            value = spec.convert(text, f"environment variable {var}: ") if spec.values else \
                _parse_env_value(var, text, _field_types(var_cls)[name], spec.target or name)
            prefix = "" if var_cls is FlexKVConfig else "cache_config."
            if name in given:
                raise ConfigError(f"environment variables {var} and {given[name][0]} both set {prefix}{name}; unset "
                                  "one of them", prefix + name)
            given[name] = (var, value)
            (top if var_cls is FlexKVConfig else cache)[name] = value
            sources[prefix + name] = f"environment variable {var} (the original FlexKV's name)"
            continue
        if var not in table:
            close = difflib.get_close_matches(var, list(table), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            logger.warning("ignoring environment variable %s: it is not a FlexKV config key%s", var, hint)
            continue
        cls, name = table[var]
        prefix = "" if cls is FlexKVConfig else "cache_config."
        value = _parse_env_value(var, env[var], _field_types(cls)[name], prefix + name)
        given[name] = (var, value)
        if cls is FlexKVConfig:
            top[name] = value
        else:
            cache[name] = value
        sources[prefix + name] = f"environment variable {var}"
    warn_no_effect(ignored, "environment")
    for blocks_key, gb_key in _SIZE_PAIRS:
        if blocks_key in given and gb_key in given and given[gb_key][1] is not None:
            raise ConfigError(f"environment variables {given[blocks_key][0]} and {given[gb_key][0]} both size the "
                              f"same tier; unset one of them", f"cache_config.{blocks_key}")
        for mine, other in ((blocks_key, gb_key), (gb_key, blocks_key)):
            if mine in given and given[mine][1] is not None and other in cache and other not in given:
                logger.info("%s replaces %s from the config file", given[mine][0], other)
                del cache[other]


__all__ = [
    "DEFAULT_CPU_CACHE_GB",
    "RESERVED_ENV_PREFIXES",
    "RESERVED_ENV_VARS",
    "env_override_names",
    "load_config",
    "resolve_config_path",
    "strip_json_comments",
    "upstream_keys_in",
]
