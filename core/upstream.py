"""The original FlexKV's config keys, environment variables and constructor arguments, read here.

``config_keys.json``'s ``upstream`` section lists every key the original knows and this version does not have
under that name: ``as`` names the key here with the same meaning, ``none`` says why the key has no effect here.
A key of the first kind is read as its counterpart; one of the second kind is accepted and named in ONE warning
(:func:`warn_no_effect`, once per key and process; ``flexkv check-config`` explains each). A typo of a key is
still an error with a did-you-mean, and a value that contradicts another (``kv_dim`` against ``use_mla``,
``pp_size`` > 1) is an error.

The constructors of ``ModelConfig`` and ``CacheConfig`` take the original's positional order
(:func:`model_kwargs`, :func:`cache_kwargs`); each positional argument is type-checked, so a value in the wrong
place fails naming the parameter it landed on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config_keys import KEYS_FILE, section_keys
from .errors import ConfigError

logger = logging.getLogger("flexkv")


@dataclass(frozen=True)
class UpstreamKey:
    """One key of the original that is not a key here."""

    name: str
    target: str | None  # "cache_config.tokens_per_block": the key here with the same meaning; None: no effect
    values: Mapping[str, Any] | None  # the original's value (as text) -> the value of ``target``
    reason: str | None  # why the key has no effect here
    default: Any = None  # the original's default (for a key without effect)

    @property
    def section(self) -> str | None:
        return self.target.split(".", 1)[0] if self.target else None

    @property
    def field(self) -> str | None:
        return self.target.split(".", 1)[1] if self.target else None

    def convert(self, value: Any, where: str) -> Any:
        """The value for ``target``: mapped through ``values`` when the key has a value table."""
        if self.values is None:
            return value
        text = str(value).strip().lower() if not isinstance(value, bool) else None
        if text is not None and text in self.values:
            return self.values[text]
        allowed = ", ".join(self.values)
        raise ConfigError(f"{where}{self.name} = {value!r} is not valid; use one of: {allowed} "
                          f"(the original FlexKV's meaning; here it sets {self.target})", self.name)


def _load() -> tuple[dict[str, UpstreamKey], dict[str, str], dict[str, str]]:
    raw = json.loads(KEYS_FILE.read_text(encoding="utf-8"))["upstream"]
    keys: dict[str, UpstreamKey] = {}
    for name, spec in raw["keys"].items():
        target = spec.get("as")
        if target is not None:
            section, _, field = target.partition(".")
            if field not in section_keys(section):
                raise ImportError(f"{KEYS_FILE.name}: upstream.{name} maps to {target}, which is not a key")
        elif "none" not in spec:
            raise ImportError(f"{KEYS_FILE.name}: upstream.{name} needs 'as' or 'none'")
        keys[name] = UpstreamKey(name, target, spec.get("values"), spec.get("none"), spec.get("default"))
    env = {f"FLEXKV_{name.upper()}": name for name in keys}
    env.update(raw["env_names"])
    return keys, dict(raw["sections"]), env


UPSTREAM_KEYS, UPSTREAM_SECTIONS, UPSTREAM_ENV = _load()
NO_EFFECT: dict[str, UpstreamKey] = {k: v for k, v in UPSTREAM_KEYS.items() if v.target is None}

_warned: set[str] = set()
_warn_lock = threading.Lock()


def explain(name: str) -> str:
    """One line on an original key: what it maps to here, or why it has no effect."""
    key = UPSTREAM_KEYS[name]
    if key.target is not None:
        return f"{name}: the original FlexKV's name of {key.target}"
    return f"{name}: no effect here ({key.reason})"


def warn_no_effect(names: Iterable[str], where: str = "") -> None:
    """ONE warning naming the original FlexKV's keys among ``names`` that have no effect here (each key is named
    once per process)."""
    with _warn_lock:
        fresh = [n for n in dict.fromkeys(names) if n in NO_EFFECT and n not in _warned]
        _warned.update(fresh)
    if fresh:
        src = f"{where}: " if where else ""
        logger.warning("FlexKV: %sthe original FlexKV's key(s) %s have no effect here and are ignored; "
                       "`flexkv check-config` explains each", src, ", ".join(fresh))


def reset_warnings() -> None:
    """Forget which keys were warned about (for tests)."""
    with _warn_lock:
        _warned.clear()


# ---------------------------------------------------------------------------------------------
# constructor arguments
# ---------------------------------------------------------------------------------------------

# The original's positional orders.
MODEL_POSITIONAL = ("num_layers", "num_kv_heads", "head_size", "kv_dim", "dtype", "tp_size", "pp_size", "dp_size")
CACHE_POSITIONAL = ("tokens_per_block", "eviction_policy", "enable_cpu", "enable_ssd", "enable_gds", "enable_nixl",
                    "nixl_extra_config", "enable_remote", "enable_kv_sharing", "enable_p2p_cpu", "enable_p2p_ssd",
                    "enable_3rd_remote", "distributed_node_id", "num_tmp_cpu_blocks", "use_hugepage_cpu_buffer",
                    "use_hugepage_tmp_buffer", "hugepage_size_bytes", "num_cpu_blocks", "num_ssd_blocks",
                    "num_remote_blocks", "num_local_blocks", "ssd_cache_dir")

# ModelConfig arguments of the original that must keep their default: anything else splits blocks differently.
_MODEL_MUST_BE = {"pp_size": 1, "cp_size": 1, "attn_cp_size": 1, "nnodes": 1, "layer_groups": None}
_MODEL_NO_EFFECT = ("enable_dp_attention", "master_host", "master_ports", "use_trtllm_subprocess",
                    "trtllm_subprocess_host", "trtllm_subprocess_ports", "instance_num")


def _int_like(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kv_dim_to_mla(value: Any, where: str = "ModelConfig") -> bool:
    """``kv_dim`` (2: K and V, 1: one latent per token) as ``use_mla``; anything else fails naming it."""
    if not _int_like(value) or value not in (1, 2):
        hint = "; pass use_mla=True by keyword for MLA" if isinstance(value, bool) else ""
        raise ConfigError(f"{where}: kv_dim must be 1 (MLA, one latent per token) or 2 (K and V), got "
                          f"{value!r}{hint}", "model_config.kv_dim")
    return value == 1


def _positional(cls_name: str, order: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                check: Any) -> dict[str, Any]:
    if len(args) > len(order):
        raise TypeError(f"{cls_name} takes at most {len(order)} positional arguments ({', '.join(order)}), "
                        f"got {len(args)}")
    out = dict(kwargs)
    for i, (name, value) in enumerate(zip(order, args)):
        if name in kwargs:
            raise TypeError(f"{cls_name} got argument {name!r} both by position ({i + 1}) and by keyword")
        check(name, value, i + 1)
        out[name] = value
    return out


def _type_error(cls_name: str, name: str, pos: int, want: str, value: Any) -> TypeError:
    return TypeError(f"{cls_name}: positional argument {pos} is {name} (the original FlexKV's order), which must "
                     f"be {want}; got {value!r} ({type(value).__name__}). Pass arguments by keyword to be sure")


def model_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """ModelConfig's arguments (the original's order and names) as the keyword arguments of its fields here."""
    def check(name: str, value: Any, pos: int) -> None:
        if name == "dtype":
            return  # checked by validate(): a name, a torch.dtype or a numpy dtype
        if name == "kv_dim":
            if not _int_like(value) or value not in (1, 2):
                raise _type_error("ModelConfig", name, pos, "1 (MLA) or 2 (K and V); use_mla=... goes by keyword",
                                  value)
            return
        if not _int_like(value):
            raise _type_error("ModelConfig", name, pos, "an int", value)

    out = _positional("ModelConfig", MODEL_POSITIONAL, args, kwargs, check)
    if "kv_dim" in out:
        mla = kv_dim_to_mla(out.pop("kv_dim"))
        if "use_mla" in out and bool(out["use_mla"]) != mla:
            raise ConfigError(f"ModelConfig: kv_dim={2 - mla} and use_mla={out['use_mla']!r} disagree; give one "
                              "of them", "model_config.kv_dim")
        out["use_mla"] = mla
    for name, want in _MODEL_MUST_BE.items():
        if name in out:
            value = out.pop(name)
            if value != want:
                raise ConfigError(f"ModelConfig: {name} = {value!r} is not supported here (only {want!r}): this "
                                  "version splits blocks by tensor parallelism only", f"model_config.{name}")
    ignored = [n for n in _MODEL_NO_EFFECT if n in out]
    for name in ignored:
        out.pop(name)
    if ignored:
        _warn_args("ModelConfig", ignored, "multi-node, multi-instance and TRT-LLM subprocess settings of the "
                   "original; instance_num is a config-file key here")
    known = set(fields)
    unknown = [n for n in out if n not in known]
    if unknown:
        raise TypeError(f"ModelConfig got unexpected argument(s) {', '.join(unknown)}; "
                        f"arguments: {', '.join([*MODEL_POSITIONAL, *sorted(known - set(MODEL_POSITIONAL))])}")
    return out


def cache_kwargs(args: tuple[Any, ...], kwargs: dict[str, Any], fields: Iterable[str]
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """CacheConfig's arguments (the original's order and names): (keyword arguments of its fields here, the
    original's arguments that have no effect here)."""
    known = set(fields)
    spec = section_keys("cache_config")

    def check(name: str, value: Any, pos: int) -> None:
        if name in spec:
            from .config import CacheConfig, _check_type

            try:
                _check_type(CacheConfig, name, value, name)
            except ConfigError as err:
                raise _type_error("CacheConfig", name, pos, str(err).split(" must be ", 1)[-1].split(", got")[0],
                                  value) from None
            return
        default = NO_EFFECT[name].default
        if default is not None and (type(value) is not type(default)) and not (
                isinstance(default, float) and _int_like(value)):
            raise _type_error("CacheConfig", name, pos, f"a {type(default).__name__}", value)

    out = _positional("CacheConfig", CACHE_POSITIONAL, args, kwargs, check)
    extra: dict[str, Any] = {}
    for name in list(out):
        if name in known:
            continue
        key = UPSTREAM_KEYS.get(name)
        if key is None:
            continue
        value = out.pop(name)
        if key.target is None:
            extra[name] = value
        elif key.section == "cache_config" and key.field not in out:
            out[key.field] = key.convert(value, "CacheConfig: ")
    unknown = [n for n in out if n not in known]
    if unknown:
        import difflib

        hints = [f"{n} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(n, [*known, *NO_EFFECT], 1))
                 else n for n in unknown]
        raise TypeError(f"CacheConfig got unexpected argument(s) {', '.join(hints)}")
    changed = [n for n, v in extra.items() if v != NO_EFFECT[n].default]
    if changed:
        warn_no_effect(changed, "CacheConfig")
    return out, extra


def _warn_args(cls_name: str, names: list[str], why: str) -> None:
    with _warn_lock:
        fresh = [n for n in names if f"{cls_name}.{n}" not in _warned]
        _warned.update(f"{cls_name}.{n}" for n in fresh)
    if fresh:
        logger.warning("FlexKV: %s argument(s) %s of the original FlexKV have no effect here (%s)",
                       cls_name, ", ".join(fresh), why)


__all__ = [
    "CACHE_POSITIONAL",
    "MODEL_POSITIONAL",
    "NO_EFFECT",
    "UPSTREAM_KEYS",
    "UPSTREAM_ENV",
    "UPSTREAM_SECTIONS",
    "UpstreamKey",
    "cache_kwargs",
    "explain",
    "kv_dim_to_mla",
    "model_kwargs",
    "reset_warnings",
    "warn_no_effect",
]
