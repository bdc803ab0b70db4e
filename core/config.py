"""FlexKV configuration: the model shape, the cache tiers, the file loader and the resource check.

One JSON (or YAML) file drives every engine. Two layouts are accepted and may be mixed:

* the manual's long form: top-level ``server_recv_port``, ``cache_config: {...}``, optional
  ``model_config: {...}``, ``enable_flexkv``, ``num_log_interval_requests``;
* the short form: top-level ``cpu_cache_gb``, ``ssd_cache_gb``, ``ssd_cache_dir`` (sizes in GiB,
  turned into block counts by :meth:`CacheConfig.resolved` once the model shape is known).

``//`` line comments and ``/* */`` comments are accepted in JSON (people copy them from the manual).
After the file, ``FLEXKV_<KEY>`` environment variables override single keys. Every mistake is a
:class:`ConfigError` naming the key, the value and what would work.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import yaml

from .errors import ConfigError

logger = logging.getLogger("flexkv")

GiB = 1024**3

# Environment variables starting with FLEXKV_ that are not config keys and must not be warned about.
# Other modules may add their own names here (at import time) before load_config runs.
RESERVED_ENV_VARS: set[str] = {"FLEXKV_CONFIG_PATH", "FLEXKV_LOG_LEVEL"}
RESERVED_ENV_PREFIXES: tuple[str, ...] = ("FLEXKV_TEST_",)

# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
    "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2",
    "int8": "int8", "uint8": "uint8",
}
_DTYPE_ITEMSIZE: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}


def _dtype_name(dtype: Any, key: str = "model_config.dtype") -> str:
    """Canonical name of a dtype given as a string, a torch.dtype or a numpy dtype."""
    raw: str | None = None
    if isinstance(dtype, str):
        raw = dtype
    elif isinstance(dtype, np.dtype):
        raw = dtype.name
    elif isinstance(dtype, type) and issubclass(dtype, np.generic):
        raw = np.dtype(dtype).name
    elif type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        raw = str(dtype)  # "torch.bfloat16"; torch itself is never imported here
    if raw is not None:
        name = raw.strip().lower()
        name = name.removeprefix("torch.")
        if name in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[name]
    valid = ", ".join(sorted(_DTYPE_ALIASES))
    raise ConfigError(f"{key} = {dtype!r} is not a supported KV cache dtype; use one of: {valid} "
                      f"(or the matching torch / numpy dtype)", key)


def format_bytes(n: float) -> str:
    """``4194304`` -> ``'4 MiB'``; binary units, at most two decimals."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# strict type checks shared by the dataclasses, the file loader and the environment parser
# ---------------------------------------------------------------------------------------------

def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _matches(value: Any, tp: Any) -> bool:
    """isinstance for the handful of annotation shapes the config uses; a bool is not an int."""
    if tp is Any:
        return True
    members = _union_args(tp)
    if members is not None:
        return any(_matches(value, m) for m in members)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, origin)


def _describe_type(tp: Any) -> str:
    members = _union_args(tp)
    if members is not None:
        return " or ".join(_describe_type(m) for m in members)
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Any: "any value"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp) or tp
    if origin is dict:
        return "an object ({...})"
    if origin is list:
        return "a list of strings" if typing.get_args(tp) == (str,) else "a list"
    return getattr(tp, "__name__", str(tp))


def _describe_value(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def _check_type(cls: type, name: str, value: Any, key: str) -> None:
    tp = _field_types(cls)[name]
    if not _matches(value, tp):
        hint = ""
        if isinstance(value, str) and _matches(0, tp) and value.strip().lstrip("-").isdigit():
            hint = f"; write {value.strip()} without quotes"
        elif isinstance(value, float) and value.is_integer() and _matches(0, tp):
            hint = f"; write {int(value)}"
        elif isinstance(value, (int, str)) and not isinstance(value, bool) and tp is bool:
            hint = "; write true or false"
        raise ConfigError(f"{key} must be {_describe_type(tp)}, got {_describe_value(value)}{hint}", key)


_FIELD_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        _FIELD_TYPE_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _FIELD_TYPE_CACHE[cls]


def _check_int_range(key: str, value: int, low: int, high: int | None = None, why: str = "") -> None:
    if value < low or (high is not None and value > high):
        expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"{key} = {value!r} is out of range: expected {expected}{why}", key)


def _split_dirs(value: str) -> str | list[str]:
    if ";" not in value:
        return value
    return [p.strip() for p in value.split(";") if p.strip()]


# ---------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The KV shape of a model. ``num_kv_heads`` counts all tensor-parallel ranks: a block holds every rank's slice."""

    num_layers: int = 1
    num_kv_heads: int = 1
    head_size: int = 1
    use_mla: bool = False
    dtype: Any = "bfloat16"  # a str ("bfloat16", "fp8", ...), a torch.dtype or a numpy dtype
    tp_size: int = 1
    dp_size: int = 1

    @property
    def kv_dim(self) -> int:
        return 1 if self.use_mla else 2

    @property
    def dtype_name(self) -> str:
        return _dtype_name(self.dtype)

    @property
    def itemsize(self) -> int:
        return _DTYPE_ITEMSIZE[self.dtype_name]

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.kv_dim * self.num_kv_heads * self.head_size * self.itemsize

    @property
    def token_size_in_bytes(self) -> int:
        return self.num_layers * self.bytes_per_token_per_layer

    def block_bytes(self, tokens_per_block: int) -> int:
        """Bytes of one block in the host layout: ``tokens_per_block`` tokens of every layer, k and v, every rank."""
        return tokens_per_block * self.token_size_in_bytes

    def torch_dtype(self) -> Any:
        """The matching ``torch.dtype`` (imports torch lazily)."""
        import torch

        return getattr(torch, self.dtype_name)

    def fingerprint(self) -> str:
        """A stable string of the KV layout; it namespaces cache keys so two layouts never share a block."""
        return (f"dtype={self.dtype_name};kv_heads={self.num_kv_heads};head_size={self.head_size};"
                f"layers={self.num_layers};mla={int(bool(self.use_mla))};tp={self.tp_size}")

    def validate(self) -> ModelConfig:
        """Raise ConfigError naming the first bad field; return self."""
        for f in dataclasses.fields(self):
            key = f"model_config.{f.name}"
            value = getattr(self, f.name)
            if f.name == "dtype":
                _dtype_name(value, key)
                continue
            _check_type(ModelConfig, f.name, value, key)
            if isinstance(value, int) and not isinstance(value, bool):
                _check_int_range(key, value, 1)
        return self


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(num_layers=2, num_kv_heads=2, head_size=64, dtype="float16"),
    "qwen-32b": ModelConfig(num_layers=64, num_kv_heads=8, head_size=128, dtype="bfloat16"),
    "llama-70b": ModelConfig(num_layers=80, num_kv_heads=8, head_size=128, dtype="bfloat16"),
    "deepseek-r1-distill-llama-70b": ModelConfig(num_layers=80, num_kv_heads=8, head_size=128, dtype="bfloat16"),
}


def model_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset from MODEL_PRESETS (so callers may change it)."""
    key = name.strip().lower()
    if key not in MODEL_PRESETS:
        close = difflib.get_close_matches(key, MODEL_PRESETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown model preset {name!r}; {hint}presets: {', '.join(sorted(MODEL_PRESETS))}", "model")
    return dataclasses.replace(MODEL_PRESETS[key])


# ---------------------------------------------------------------------------------------------
# CacheConfig
# ---------------------------------------------------------------------------------------------

EVICTION_POLICIES = ("lru",)


@dataclass
class CacheConfig:
    """The cache tiers. Sizes are block counts, or GiB through ``cpu_cache_gb`` / ``ssd_cache_gb``."""

    tokens_per_block: int = 16
    enable_cpu: bool = True
    enable_ssd: bool = False
    enable_remote: bool = False
    num_cpu_blocks: int = 1000000
    num_ssd_blocks: int = 10000000
    num_remote_blocks: int | None = None
    ssd_cache_dir: str | list[str] | None = None  # a ';'-separated string becomes a list
    remote_cache_path: str | None = None
    remote_config_custom: dict[str, Any] | None = None
    evict_ratio: float = 0.0
    use_ce_transfer_h2d: bool = False
    use_ce_transfer_d2h: bool = False
    transfer_sms_h2d: int = 8
    transfer_sms_d2h: int = 8
    ssd_cache_iouring_entries: int = 512
    ssd_cache_iouring_flags: int = 0
    use_hugepage_cpu_buffer: bool = False
    eviction_policy: str = "lru"
    cpu_cache_gb: float | None = None
    ssd_cache_gb: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ssd_cache_dir, str):
            self.ssd_cache_dir = _split_dirs(self.ssd_cache_dir)

    @property
    def ssd_cache_dirs(self) -> list[str]:
        """``ssd_cache_dir`` as a list (empty when unset)."""
        if self.ssd_cache_dir is None:
            return []
        if isinstance(self.ssd_cache_dir, str):
            found = _split_dirs(self.ssd_cache_dir)
            return [found] if isinstance(found, str) else found
        return list(self.ssd_cache_dir)

    def validate(self) -> CacheConfig:
        """Check types strictly and ranges; raise ConfigError naming the key. Return self."""
        for f in dataclasses.fields(self):
            _check_type(CacheConfig, f.name, getattr(self, f.name), f"cache_config.{f.name}")
        k = "cache_config."
        if not self.enable_cpu:
            raise ConfigError(f"{k}enable_cpu = false is not supported: FlexKV always stages blocks through "
                              "CPU memory; set enable_cpu to true (size it with num_cpu_blocks or cpu_cache_gb)",
                              f"{k}enable_cpu")
        _check_int_range(f"{k}tokens_per_block", self.tokens_per_block, 1,
                         why=" (the engine's block or page size, e.g. 16)")
        if not (0.0 <= self.evict_ratio <= 1.0):
            raise ConfigError(f"{k}evict_ratio = {self.evict_ratio!r} is out of range: expected a number in [0, 1] "
                              "(the share of extra blocks freed per eviction, e.g. 0.05)", f"{k}evict_ratio")
        if self.cpu_cache_gb is None:
            _check_int_range(f"{k}num_cpu_blocks", self.num_cpu_blocks, 1)
        if self.enable_ssd and self.ssd_cache_gb is None:
            _check_int_range(f"{k}num_ssd_blocks", self.num_ssd_blocks, 1)
        if self.num_remote_blocks is not None:
            _check_int_range(f"{k}num_remote_blocks", self.num_remote_blocks, 1)
        elif self.enable_remote:
            raise ConfigError(f"{k}num_remote_blocks is required when enable_remote is true: give the remote "
                              "tier's size in blocks, e.g. 20000000", f"{k}num_remote_blocks")
        for name in ("transfer_sms_h2d", "transfer_sms_d2h"):
            _check_int_range(f"{k}{name}", getattr(self, name), 1, 256, " (SMs used by the copy kernels, e.g. 8)")
        _check_int_range(f"{k}ssd_cache_iouring_entries", self.ssd_cache_iouring_entries, 1,
                         why=" (io_uring queue depth, e.g. 512)")
        _check_int_range(f"{k}ssd_cache_iouring_flags", self.ssd_cache_iouring_flags, 0)
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(f"{k}eviction_policy = {self.eviction_policy!r} is not supported; use one of: "
                              f"{', '.join(EVICTION_POLICIES)}", f"{k}eviction_policy")
        if self.cpu_cache_gb is not None and not (math.isfinite(self.cpu_cache_gb) and self.cpu_cache_gb > 0):
            raise ConfigError(f"{k}cpu_cache_gb = {self.cpu_cache_gb!r} is out of range: expected a number > 0 "
                              "(GiB of CPU memory, e.g. 32)", f"{k}cpu_cache_gb")
        if self.ssd_cache_gb is not None and not (math.isfinite(self.ssd_cache_gb) and self.ssd_cache_gb >= 0):
            raise ConfigError(f"{k}ssd_cache_gb = {self.ssd_cache_gb!r} is out of range: expected a number >= 0 "
                              "(GiB of SSD space; 0 disables the SSD tier)", f"{k}ssd_cache_gb")
        if self.ssd_cache_gb == 0 and self.enable_ssd:
            raise ConfigError(f"{k}ssd_cache_gb = 0 disables the SSD tier but enable_ssd is true; give ssd_cache_gb "
                              "> 0 or set enable_ssd to false", f"{k}ssd_cache_gb")
        default_cpu = _field_default(CacheConfig, "num_cpu_blocks")
        if self.cpu_cache_gb is not None and self.num_cpu_blocks != default_cpu:
            raise _both_sizes_error("cpu", "num_cpu_blocks", "cpu_cache_gb")
        default_ssd = _field_default(CacheConfig, "num_ssd_blocks")
        if self.ssd_cache_gb is not None and self.num_ssd_blocks != default_ssd:
            raise _both_sizes_error("ssd", "num_ssd_blocks", "ssd_cache_gb")
        if isinstance(self.ssd_cache_dir, list) and not self.ssd_cache_dir:
            raise ConfigError(f"{k}ssd_cache_dir is an empty list; give at least one directory or null",
                              f"{k}ssd_cache_dir")
        if any(not d.strip() for d in self.ssd_cache_dirs) or self.ssd_cache_dir == "":
            raise ConfigError(f"{k}ssd_cache_dir contains an empty path; give directories such as "
                              "\"/data/flexkv_ssd/\" (several separated by ';')", f"{k}ssd_cache_dir")
        ssd_on = self.enable_ssd or (self.ssd_cache_gb is not None and self.ssd_cache_gb > 0)
        if ssd_on and not self.ssd_cache_dirs:
            raise ConfigError(f"{k}ssd_cache_dir is required when the SSD tier is enabled: give a directory such as "
                              "\"/data/flexkv_ssd/\" (several separated by ';'), or disable the SSD tier",
                              f"{k}ssd_cache_dir")
        return self

    def resolved(self, model_config: ModelConfig | None = None) -> CacheConfig:
        """A copy with ``cpu_cache_gb`` / ``ssd_cache_gb`` turned into ``num_cpu_blocks`` / ``num_ssd_blocks``.

        The GiB fields of the copy are None; ``ssd_cache_gb > 0`` enables the SSD tier, ``0`` disables it.
        A config without GiB fields is returned as an unchanged copy and needs no model.
        """
        out = dataclasses.replace(self)
        if self.cpu_cache_gb is None and self.ssd_cache_gb is None:
            return out
        if model_config is None:
            key = "cache_config.cpu_cache_gb" if self.cpu_cache_gb is not None else "cache_config.ssd_cache_gb"
            raise ConfigError(f"{key} is in GiB and turning it into blocks needs the model shape: pass a "
                              "ModelConfig, add \"model_config\" to the file, or give num_cpu_blocks / "
                              "num_ssd_blocks instead", key)
        block = model_config.block_bytes(self.tokens_per_block)
        if self.cpu_cache_gb is not None:
            out.num_cpu_blocks = max(1, int(self.cpu_cache_gb * GiB // block))
            out.cpu_cache_gb = None
        if self.ssd_cache_gb is not None:
            if self.ssd_cache_gb > 0:
                out.num_ssd_blocks = max(1, int(self.ssd_cache_gb * GiB // block))
                out.enable_ssd = True
            else:
                out.enable_ssd = False
            out.ssd_cache_gb = None
        return out


def _field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _both_sizes_error(tier: str, blocks_key: str, gb_key: str) -> ConfigError:
    return ConfigError(
        f"cache_config.{blocks_key} and cache_config.{gb_key} both size the {tier.upper()} tier; drop one of them: "
        f"drop {blocks_key} to size it in GiB, or drop {gb_key} to size it in blocks", f"cache_config.{blocks_key}")


# ---------------------------------------------------------------------------------------------
# FlexKVConfig and the loader
# ---------------------------------------------------------------------------------------------

@dataclass
class FlexKVConfig:
    """What one config file holds."""

    server_recv_port: str = "ipc:///tmp/flexkv_server"
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    model_config: ModelConfig | None = None
    enable_flexkv: bool = True
    num_log_interval_requests: int = 200

    def validate(self) -> FlexKVConfig:
        for name in ("server_recv_port", "enable_flexkv", "num_log_interval_requests"):
            _check_type(FlexKVConfig, name, getattr(self, name), name)
        if "://" not in self.server_recv_port:
            raise ConfigError(f"server_recv_port = {self.server_recv_port!r} is not a ZeroMQ endpoint; use e.g. "
                              "\"ipc:///tmp/flexkv_server\" or \"tcp://127.0.0.1:5555\"", "server_recv_port")
        _check_int_range("num_log_interval_requests", self.num_log_interval_requests, 0)
        self.cache_config.validate()
        if self.model_config is not None:
            self.model_config.validate()
        return self

    def resolved_cache(self, model_config: ModelConfig | None = None) -> CacheConfig:
        """``cache_config.resolved(...)`` with ``model_config`` or, failing that, the file's model_config."""
        return self.cache_config.resolved(model_config or self.model_config)


_TOP_KEYS = ("server_recv_port", "cache_config", "model_config", "enable_flexkv", "num_log_interval_requests")
_SHORT_KEYS = ("cpu_cache_gb", "ssd_cache_gb", "ssd_cache_dir")
_TOP_SCALARS = ("server_recv_port", "enable_flexkv", "num_log_interval_requests")
_SIZE_PAIRS = (("num_cpu_blocks", "cpu_cache_gb"), ("num_ssd_blocks", "ssd_cache_gb"))


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
    top, cache, model, sources = _split_layout(raw, where)
    _apply_env(top, cache, sources, env)
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

    for key, value in raw.items():
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
        if key not in cache_keys:
            elsewhere = {k: "model_config" for k in model_keys}
            elsewhere.update({k: "the top level" for k in _TOP_KEYS})
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
            if key not in model_keys:
                elsewhere = {k: "cache_config" for k in cache_keys}
                elsewhere.update({k: "the top level" for k in _TOP_KEYS})
                raise _unknown_key("model_config", key, model_keys, elsewhere, where)
            if key == "dtype":
                if not isinstance(value, str):
                    raise ConfigError(f"{where}: model_config.dtype must be a string such as \"bfloat16\", "
                                      f"got {_describe_value(value)}", "model_config.dtype")
            else:
                _check_type_at(ModelConfig, key, value, f"model_config.{key}", where)
            model[key] = value

    for blocks_key, gb_key in _SIZE_PAIRS:
        if blocks_key in cache and cache.get(gb_key) is not None:
            err = _both_sizes_error("cpu" if "cpu" in gb_key else "ssd", blocks_key, gb_key)
            raise ConfigError(f"{where}: {err}", err.key)
    return top, cache, model, sources


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
    for var in sorted(env):
        if not var.startswith("FLEXKV_"):
            continue
        if var in RESERVED_ENV_VARS or var.startswith(RESERVED_ENV_PREFIXES):
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
    for blocks_key, gb_key in _SIZE_PAIRS:
        if blocks_key in given and gb_key in given and given[gb_key][1] is not None:
            raise ConfigError(f"environment variables {given[blocks_key][0]} and {given[gb_key][0]} both size the "
                              f"same tier; unset one of them", f"cache_config.{blocks_key}")
        for mine, other in ((blocks_key, gb_key), (gb_key, blocks_key)):
            if mine in given and given[mine][1] is not None and other in cache and other not in given:
                logger.info("%s replaces %s from the config file", given[mine][0], other)
                del cache[other]


# ---------------------------------------------------------------------------------------------
# resources
# ---------------------------------------------------------------------------------------------

def read_mem_available() -> int | None:
    """Bytes of memory this process can still get: MemAvailable, capped by a cgroup limit if one is set."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
            break
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < (1 << 60):
            room = max(0, int(limit_text) - usage)
            available = room if available is None else min(available, room)
        break
    return available


def read_shm_free() -> int | None:
    """Free bytes of /dev/shm, where the CPU tier's POSIX shared memory lives."""
    return read_disk_free("/dev/shm")


def read_disk_free(path: str) -> int | None:
    """Free bytes (for an unprivileged user) of the filesystem holding ``path``."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _existing_ancestor(path: str) -> Path:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _floor2(x: float) -> float:
    return math.floor(x * 100) / 100


def _resource_problems(cache_config: CacheConfig, model_config: ModelConfig,
                       mem_available: Callable[[], int | None] | None = None,
                       shm_free: Callable[[], int | None] | None = None,
                       disk_free: Callable[[str], int | None] | None = None) -> list[tuple[str, str]]:
    mem_available = mem_available or read_mem_available
    shm_free = shm_free or read_shm_free
    disk_free = disk_free or read_disk_free
    resolved = cache_config.resolved(model_config)
    block = model_config.block_bytes(resolved.tokens_per_block)
    problems: list[tuple[str, str]] = []

    # CPU tier: POSIX shared memory, so both MemAvailable and the free space of /dev/shm bound it.
    need = resolved.num_cpu_blocks * block
    limits = []
    mem, shm = mem_available(), shm_free()
    if mem is not None:
        limits.append((mem, f"MemAvailable {format_bytes(mem)}"))
    if shm is not None:
        limits.append((shm, f"/dev/shm free {format_bytes(shm)}"))
    if limits and need > min(v for v, _ in limits):
        room = min(v for v, _ in limits)
        key, advice = _largest("cpu", cache_config.cpu_cache_gb is not None, room // block, block)
        fix = ""
        if shm is not None and shm == room and (mem is None or shm < mem):
            fix = "; or grow /dev/shm (in Docker: --shm-size)"
        problems.append((key, f"{key}: the CPU tier needs {format_bytes(need)} of CPU memory "
                              f"({resolved.num_cpu_blocks} blocks x {format_bytes(block)}) but only "
                              f"{format_bytes(room)} is available ({', '.join(t for _, t in limits)}); {advice}{fix}"))

    # SSD tier: the need is split evenly across the directories; directories on one filesystem add up.
    if resolved.enable_ssd and resolved.ssd_cache_dirs:
        dirs = resolved.ssd_cache_dirs
        per_dir_blocks = -(-resolved.num_ssd_blocks // len(dirs))
        groups: dict[Any, tuple[Path, list[str]]] = {}
        for d in dirs:
            anchor = _existing_ancestor(d)
            if anchor.exists() and not anchor.is_dir():
                problems.append(("cache_config.ssd_cache_dir",
                                 f"cache_config.ssd_cache_dir: {d!r} cannot be a directory ({anchor} is a file); "
                                 "give a directory path"))
                continue
            try:
                dev: Any = os.stat(anchor).st_dev
            except OSError:
                dev = str(anchor)
            groups.setdefault(dev, (anchor, []))[1].append(d)
        max_per_dir: int | None = None
        short = []
        for anchor, members in groups.values():
            free = disk_free(str(anchor))
            if free is None:
                continue
            fits = free // (block * len(members))
            max_per_dir = fits if max_per_dir is None else min(max_per_dir, fits)
            group_need = per_dir_blocks * block * len(members)
            if group_need > free:
                short.append(f"{', '.join(members)} need {format_bytes(group_need)} but the filesystem of {anchor} "
                             f"has {format_bytes(free)} free")
        if short and max_per_dir is not None:
            key, advice = _largest("ssd", cache_config.ssd_cache_gb is not None, max_per_dir * len(dirs), block)
            problems.append((key, f"{key}: the SSD tier needs {format_bytes(resolved.num_ssd_blocks * block)} of disk "
                                  f"({resolved.num_ssd_blocks} blocks x {format_bytes(block)}, split evenly over "
                                  f"{len(dirs)} dir(s)), and {'; '.join(short)}; {advice}"))
    return problems


def _largest(tier: str, by_gb: bool, largest_blocks: int, block: int) -> tuple[str, str]:
    """The key that sizes ``tier`` and advice naming its largest value that fits in ``largest_blocks`` blocks."""
    if by_gb:
        key = f"cache_config.{tier}_cache_gb"
        best = _floor2(largest_blocks * block / GiB)
        if best > 0:
            return key, f"the largest {tier}_cache_gb that fits is {best:g}"
    else:
        key = f"cache_config.num_{tier}_blocks"
        if largest_blocks > 0:
            return key, f"the largest num_{tier}_blocks that fits is {largest_blocks}"
    return key, f"not even one block ({format_bytes(block)}) fits"


def check_resources(cache_config: CacheConfig, model_config: ModelConfig, *,
                    mem_available: Callable[[], int | None] | None = None,
                    shm_free: Callable[[], int | None] | None = None,
                    disk_free: Callable[[str], int | None] | None = None) -> list[str]:
    """Messages for each tier that does not fit this machine (empty when everything fits).

    The readers default to this machine (/proc/meminfo, /dev/shm, statvfs); tests pass fakes.
    """
    return [msg for _, msg in _resource_problems(cache_config, model_config, mem_available, shm_free, disk_free)]


def require_resources(cache_config: CacheConfig, model_config: ModelConfig, *,
                      mem_available: Callable[[], int | None] | None = None,
                      shm_free: Callable[[], int | None] | None = None,
                      disk_free: Callable[[str], int | None] | None = None) -> None:
    """Raise ConfigError (naming the first key that does not fit) when a tier does not fit this machine."""
    problems = _resource_problems(cache_config, model_config, mem_available, shm_free, disk_free)
    if problems:
        raise ConfigError("; ".join(msg for _, msg in problems), problems[0][0])


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------

def describe(config: FlexKVConfig, model_config: ModelConfig | None = None, *,
             mem_available: Callable[[], int | None] | None = None,
             shm_free: Callable[[], int | None] | None = None,
             disk_free: Callable[[str], int | None] | None = None, check_machine: bool = True) -> str:
    """The resolved config, one key a line, and (with a model) the bytes per block and per enabled tier.

    With ``check_machine`` it also says whether the tiers fit this machine (readers as in check_resources).
    """
    model = model_config or config.model_config
    cache = config.cache_config
    lines = ["FlexKV config:"]
    for name in _TOP_SCALARS:
        lines.append(f"  {name:<28} = {getattr(config, name)!r}")
    resolved = cache
    if model is not None:
        resolved = cache.resolved(model)
    lines.append("cache_config:")
    for f in dataclasses.fields(cache):
        value = getattr(resolved, f.name)
        note = ""
        for blocks_key, gb_key in _SIZE_PAIRS:
            gb = getattr(cache, gb_key)
            if f.name == blocks_key and gb is not None:
                note = f"  (from {gb_key} = {gb:g})" if model else f"  (computed from {gb_key} once a model is known)"
        if f.name in ("cpu_cache_gb", "ssd_cache_gb") and model is not None:
            value = getattr(cache, f.name)
        lines.append(f"  {f.name:<28} = {value!r}{note}")
    if model is None:
        lines.append("bytes: unknown: the bytes of a block need a model shape; add \"model_config\": "
                     "{\"num_layers\": 64, \"num_kv_heads\": 8, \"head_size\": 128, \"dtype\": \"bfloat16\"} "
                     f"to the file, or pass --model PRESET ({', '.join(sorted(MODEL_PRESETS))}) or --num-layers, "
                     "--num-kv-heads, --head-size, --dtype to flexkv check-config")
        return "\n".join(lines)
    block = model.block_bytes(resolved.tokens_per_block)
    lines.append(f"model_config: num_layers={model.num_layers} num_kv_heads={model.num_kv_heads} "
                 f"head_size={model.head_size} dtype={model.dtype_name} use_mla={model.use_mla} "
                 f"tp_size={model.tp_size} dp_size={model.dp_size}")
    lines.append("bytes:")
    lines.append(f"  per token                    = {format_bytes(model.token_size_in_bytes)} "
                 f"({model.token_size_in_bytes} B: {model.num_layers} layers x {model.bytes_per_token_per_layer} B)")
    lines.append(f"  per block                    = {format_bytes(block)} ({block} B: "
                 f"{resolved.tokens_per_block} tokens)")
    tiers = [("CPU", True, resolved.num_cpu_blocks, "in POSIX shared memory"),
             ("SSD", resolved.enable_ssd, resolved.num_ssd_blocks,
              f"over {len(resolved.ssd_cache_dirs)} dir(s)"),
             ("REMOTE", resolved.enable_remote, resolved.num_remote_blocks,
              f"at {resolved.remote_cache_path}" if resolved.remote_cache_path else "")]
    for name, enabled, blocks, where in tiers:
        if not enabled:
            lines.append(f"  {name + ' tier':<28} = disabled")
        elif blocks is None:
            lines.append(f"  {name + ' tier':<28} = size unknown (num_{name.lower()}_blocks is not set)")
        else:
            lines.append(f"  {name + ' tier':<28} = {format_bytes(blocks * block)} ({blocks} blocks x "
                         f"{format_bytes(block)}) {where}".rstrip())
    if not check_machine:
        lines.append("resources: not checked against this machine")
        return "\n".join(lines)
    problems = check_resources(cache, model, mem_available=mem_available, shm_free=shm_free, disk_free=disk_free)
    if problems:
        lines.append("resources: DO NOT FIT on this machine:")
        lines.extend(f"  - {p}" for p in problems)
    else:
        lines.append("resources: fit on this machine")
    return "\n".join(lines)


__all__ = [
    "MODEL_PRESETS",
    "RESERVED_ENV_PREFIXES",
    "RESERVED_ENV_VARS",
    "CacheConfig",
    "ConfigError",
    "FlexKVConfig",
    "ModelConfig",
    "check_resources",
    "describe",
    "env_override_names",
    "format_bytes",
    "load_config",
    "model_preset",
    "read_disk_free",
    "read_mem_available",
    "read_shm_free",
    "require_resources",
    "resolve_config_path",
    "strip_json_comments",
]
