"""FlexKV configuration model: the model shape, the cache tiers and what one config file holds.

* :class:`ModelConfig`: the KV shape of a model (layers, KV heads, head size, dtype); ``MODEL_PRESETS`` names a few;
* :class:`CacheConfig`: the cache tiers, sized in blocks or in GiB (``cpu_cache_gb`` / ``ssd_cache_gb``, turned into
  block counts by :meth:`CacheConfig.resolved` once the model shape is known);
* :class:`FlexKVConfig`: the server port, the cache config, an optional model config and the logging knobs.

The three classes get their fields (names, types, defaults, order) from ``config_keys.json`` through
:func:`.config_keys.config_fields`; their bodies hold the behaviour. Types are checked strictly (a bool is not an
int), ranges and choices come from the same file; every mistake is a :class:`ConfigError` naming the key, the
value and what would work. Reading config files and ``FLEXKV_*`` environment overrides lives in
:mod:`.config_file`; checking the tiers against this machine in :mod:`.resources`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

import numpy as np

from . import upstream
from .config_keys import FileFields, check_range, config_fields, section_keys
from .errors import ConfigError

GiB = 1024**3

# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------

# Accepted names -> canonical name, from config_keys.json; the element sizes are this code's.
_DTYPE_ALIASES: dict[str, str] = dict(section_keys("model_config")["dtype"].aliases or {})
_DTYPE_ITEMSIZE: dict[str, int] = {
    "bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1,
}
if set(_DTYPE_ALIASES.values()) - set(_DTYPE_ITEMSIZE):
    raise ImportError(f"config_keys.json names dtypes without an element size here: "
                      f"{sorted(set(_DTYPE_ALIASES.values()) - set(_DTYPE_ITEMSIZE))}")


def canonical_dtype_name(dtype: Any, key: str = "model_config.dtype") -> str:
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


def _split_dirs(value: str) -> str | list[str]:
    if ";" not in value:
        return value
    return [p.strip() for p in value.split(";") if p.strip()]


# ---------------------------------------------------------------------------------------------
# ModelConfig
# ---------------------------------------------------------------------------------------------

@config_fields("model_config")
class ModelConfig(FileFields):
    """The KV shape of a model. ``num_kv_heads`` counts all tensor-parallel ranks: a block holds every rank's slice.

    Fields: config_keys.json's ``model_config``, in that order; ``dtype`` may also be a torch.dtype or a numpy dtype.
    """

    @property
    def kv_dim(self) -> int:
        """2: K and V per token; 1: one latent per token (MLA). The original FlexKV's name of ``use_mla``."""
        return 1 if self.use_mla else 2

    @kv_dim.setter
    def kv_dim(self, value: int) -> None:
        self.use_mla = upstream.kv_dim_to_mla(value)

    @property
    def pp_size(self) -> int:
        """Pipeline-parallel stages: always 1 here (the original FlexKV's field)."""
        return 1

    @pp_size.setter
    def pp_size(self, value: int) -> None:
        if value != 1:
            raise ConfigError(f"model_config.pp_size = {value!r} is not supported here (only 1)",
                              "model_config.pp_size")

    @property
    def dtype_name(self) -> str:
        return canonical_dtype_name(self.dtype)

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
        for spec in section_keys("model_config").values():
            value = getattr(self, spec.name)
            if spec.type == "dtype":
                canonical_dtype_name(value, spec.key)
                continue
            _check_type(ModelConfig, spec.name, value, spec.key)
            check_range(spec, value)
        return self


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_model_init = ModelConfig.__init__


def _model_config_init(self: ModelConfig, *args: Any, **kwargs: Any) -> None:
    """ModelConfig(num_layers, num_kv_heads, head_size, kv_dim, dtype, tp_size, pp_size, dp_size, ...): the
    original FlexKV's order, each positional argument type-checked; ``use_mla=`` and ``kv_dim=`` by keyword."""
    _model_init(self, **upstream.model_kwargs(args, kwargs, _MODEL_FIELDS))


ModelConfig.__init__ = _model_config_init  # type: ignore[method-assign]


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(num_layers=2, num_kv_heads=2, head_size=64, dtype="float16"),
    "qwen-0.5b": ModelConfig(num_layers=24, num_kv_heads=2, head_size=64, dtype="bfloat16"),
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

EVICTION_POLICIES: tuple[str, ...] = section_keys("cache_config")["eviction_policy"].choices or ()

# Keys whose range applies only in some configs: a tier's block count is checked when it sizes an enabled tier.
_RANGE_APPLIES: dict[str, typing.Callable[[CacheConfig], bool]] = {
    "num_cpu_blocks": lambda c: c.cpu_cache_gb is None,
    "num_ssd_blocks": lambda c: c.enable_ssd and c.ssd_cache_gb is None,
}


@config_fields("cache_config")
class CacheConfig(FileFields):
    """The cache tiers. Sizes are block counts, or GiB through ``cpu_cache_gb`` / ``ssd_cache_gb``.

    Fields: config_keys.json's ``cache_config``, in that order; a ';'-separated ``ssd_cache_dir`` becomes a list.
    """

    def __post_init__(self) -> None:
        if isinstance(self.ssd_cache_dir, str):
            # Annotated Any (the file's type) so static checkers do not infer the field's type from this line.
            self.ssd_cache_dir: Any = _split_dirs(self.ssd_cache_dir)

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
        for name, spec in section_keys("cache_config").items():
            applies = _RANGE_APPLIES.get(name)
            if applies is None or applies(self):
                check_range(spec, getattr(self, name))
        if self.num_remote_blocks is None and self.enable_remote:
            raise ConfigError(f"{k}num_remote_blocks is required when enable_remote is true: give the remote "
                              "tier's size in blocks, e.g. 20000000", f"{k}num_remote_blocks")
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


_CACHE_FIELDS = tuple(f.name for f in dataclasses.fields(CacheConfig))
_cache_init = CacheConfig.__init__


def _cache_config_init(self: CacheConfig, *args: Any, **kwargs: Any) -> None:
    """CacheConfig(tokens_per_block, eviction_policy, enable_cpu, enable_ssd, enable_gds, ...): the original
    FlexKV's order and arguments, each positional argument type-checked. Its arguments without effect here
    (``enable_gds``, ``remote_file_size``, ...) are kept as attributes and named in one warning."""
    fields, extra = upstream.cache_kwargs(args, kwargs, _CACHE_FIELDS)
    _cache_init(self, **fields)
    for name, value in extra.items():
        object.__setattr__(self, name, value)


CacheConfig.__init__ = _cache_config_init  # type: ignore[method-assign]
for _name, _key in upstream.NO_EFFECT.items():  # the original's attributes read their defaults
    if _name not in CacheConfig.__dict__:
        setattr(CacheConfig, _name, _key.default)


# Top-level keys that are plain values (not sections).
_TOP_SCALARS: tuple[str, ...] = tuple(name for name, spec in section_keys("top_level").items()
                                      if spec.type != "section")


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
# FlexKVConfig
# ---------------------------------------------------------------------------------------------

@config_fields("top_level", nested={"cache_config": CacheConfig, "model_config": ModelConfig})
class FlexKVConfig(FileFields):
    """What one config file holds: config_keys.json's ``top_level`` keys (the server port, the cache config, an
    optional model config, the logging knobs)."""

    def validate(self) -> FlexKVConfig:
        for name in _TOP_SCALARS:
            _check_type(FlexKVConfig, name, getattr(self, name), name)
        if "://" not in self.server_recv_port:
            raise ConfigError(f"server_recv_port = {self.server_recv_port!r} is not a ZeroMQ endpoint; use e.g. "
                              "\"ipc:///tmp/flexkv_server\" or \"tcp://127.0.0.1:5555\"", "server_recv_port")
        for name in _TOP_SCALARS:
            check_range(section_keys("top_level")[name], getattr(self, name))
        self.cache_config.validate()
        if self.model_config is not None:
            self.model_config.validate()
        return self

    def resolved_cache(self, model_config: ModelConfig | None = None) -> CacheConfig:
        """``cache_config.resolved(...)`` with ``model_config`` or, failing that, the file's model_config."""
        return self.cache_config.resolved(model_config or self.model_config)


# The (blocks, GiB) key pairs that size the same tier.
_SIZE_PAIRS = (("num_cpu_blocks", "cpu_cache_gb"), ("num_ssd_blocks", "ssd_cache_gb"))


__all__ = [
    "MODEL_PRESETS",
    "CacheConfig",
    "canonical_dtype_name",
    "ConfigError",
    "FlexKVConfig",
    "ModelConfig",
    "format_bytes",
    "model_preset",
]
