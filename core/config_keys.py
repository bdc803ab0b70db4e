"""The config key table: ``config_keys.json`` (next to this module) and what Python derives from it.

The file lists every key of a config file per section (``top_level``, ``cache_config``, ``model_config``, and the
``short_form`` cache keys that may sit at the top level) with its type, default, range or choices and a
description. The C++ library embeds the same file at build time, so both readers know the same keys.

This module turns the table into dataclass fields (:func:`config_fields`), Python annotations
(:func:`annotation_of`) and range / choice checks (:func:`check_range`) whose messages name the key, the value and
what would work.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .errors import ConfigError

KEYS_FILE = Path(__file__).with_name("config_keys.json")

# The value types of the file and the Python annotations they become (before ``nullable`` adds ``| None``).
_ANNOTATIONS: dict[str, tuple[Any, ...]] = {
    "int": (int,),
    "float": (float,),
    "bool": (bool,),
    "string": (str,),
    "object": (dict[str, Any],),
    "dirs": (str, list[str]),  # a ';'-separated string or a list of directories
    "dtype": (Any,),  # a name in the file; in Python also a torch.dtype or a numpy dtype
}
_SECTIONS = ("top_level", "cache_config", "model_config")
_SPEC_FIELDS = ("type", "default", "description", "nullable", "min", "max", "above", "choices", "hint")


@dataclass(frozen=True)
class KeySpec:
    """One line of config_keys.json."""

    section: str
    name: str
    type: str
    default: Any
    description: str
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    above: float | None = None
    choices: tuple[str, ...] | None = None
    aliases: Mapping[str, str] | None = None  # dtype only: every accepted name -> its canonical name
    hint: str | None = None

    @property
    def key(self) -> str:
        """The name errors use: ``cache_config.evict_ratio``, or the bare name at the top level."""
        return self.name if self.section == "top_level" else f"{self.section}.{self.name}"


def _spec(section: str, name: str, raw: Mapping[str, Any]) -> KeySpec:
    where = f"{KEYS_FILE.name}: {section}.{name}"
    unknown = set(raw) - set(_SPEC_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown attribute(s) {sorted(unknown)}; known: {', '.join(_SPEC_FIELDS)}")
    kind = raw.get("type")
    if kind not in _ANNOTATIONS and kind != "section":
        raise ValueError(f"{where}: type {kind!r} is not one of {', '.join([*_ANNOTATIONS, 'section'])}")
    if "default" not in raw or "description" not in raw:
        raise ValueError(f"{where}: every key needs a default and a description")
    choices = raw.get("choices")
    aliases = None
    if isinstance(choices, dict):  # dtype: canonical name -> its aliases
        aliases = {name: name for name in choices}
        aliases.update({alias: name for name, extra in choices.items() for alias in extra})
        choices = tuple(choices)
    return KeySpec(section=section, name=name, type=kind, default=raw["default"], description=raw["description"],
                   nullable=bool(raw.get("nullable", False)), min=raw.get("min"), max=raw.get("max"),
                   above=raw.get("above"), choices=tuple(choices) if choices is not None else None,
                   aliases=aliases, hint=raw.get("hint"))


def _load(path: Path) -> tuple[dict[str, dict[str, KeySpec]], tuple[str, ...], frozenset[str], tuple[str, ...]]:
    raw = json.loads(path.read_text(encoding="utf-8"))
    sections = {section: {name: _spec(section, name, spec) for name, spec in raw[section].items()}
                for section in _SECTIONS}
    short = tuple(raw["short_form"])
    missing = [name for name in short if name not in sections["cache_config"]]
    if missing:
        raise ValueError(f"{path.name}: short_form names {missing}, which are not cache_config keys")
    reserved = raw["reserved_env"]
    return sections, short, frozenset(reserved["names"]), tuple(reserved["prefixes"])


SECTIONS, SHORT_FORM_KEYS, RESERVED_ENV_NAMES, RESERVED_ENV_PREFIXES = _load(KEYS_FILE)


def section_keys(section: str) -> dict[str, KeySpec]:
    """The keys of ``top_level``, ``cache_config`` or ``model_config``, in file order."""
    return SECTIONS[section]


# ---------------------------------------------------------------------------------------------
# dataclass fields
# ---------------------------------------------------------------------------------------------

def annotation_of(spec: KeySpec, nested: Mapping[str, type] | None = None) -> Any:
    """The Python annotation of a key: ``int``, ``str | list[str] | None``, the class of a section, ..."""
    members: tuple[Any, ...]
    if spec.type == "section":
        if nested is None or spec.name not in nested:
            raise TypeError(f"section key {spec.key} needs its class (pass nested={{{spec.name!r}: cls}})")
        members = (nested[spec.name],)
    else:
        members = _ANNOTATIONS[spec.type]
    if spec.nullable:
        members = (*members, type(None))
    if Any in members:
        return Any
    return functools.reduce(operator.or_, members)


_C = TypeVar("_C", bound=type)

if TYPE_CHECKING:
    class FileFields:
        """What static type checkers see of a class whose fields :func:`config_fields` adds at import: a dataclass
        whose fields and constructor arguments are typed Any (their names live in config_keys.json, not here)."""

        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            ...

        def __getattr__(self, name: str) -> Any:
            ...

        def __setattr__(self, name: str, value: Any) -> None:
            ...
else:
    FileFields = object


def config_fields(section: str, nested: Mapping[str, type] | None = None) -> Callable[[_C], _C]:
    """Class decorator: add one dataclass field per key of ``section`` (file order, file defaults), then @dataclass.

    The class body holds the methods only; a key that collides with one of them is an error at import.
    ``nested`` maps a ``section``-typed key to its class (an empty-object default becomes a default_factory).
    """

    def apply(cls: _C) -> _C:
        own = cls.__dict__.get("__annotations__", {})
        if own:
            raise TypeError(f"{cls.__name__} declares fields {sorted(own)}; its fields come from {KEYS_FILE.name}")
        annotations: dict[str, Any] = {}
        for spec in SECTIONS[section].values():
            if spec.name in cls.__dict__:
                raise TypeError(f"{KEYS_FILE.name} key {spec.key} collides with {cls.__name__}.{spec.name}")
            annotations[spec.name] = annotation_of(spec, nested)
            default = spec.default
            if spec.type == "section" and default is not None:
                assert nested is not None and default == {}, spec.key
                value: Any = dataclasses.field(default_factory=nested[spec.name])
            elif isinstance(default, (list, dict)):
                value = dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
            else:
                value = default
            setattr(cls, spec.name, value)
        cls.__annotations__ = annotations
        dataclasses.dataclass(cls)  # adds __init__, __repr__, __eq__ to cls itself (no slots)
        return cls

    return apply


def field_default(section: str, name: str) -> Any:
    """The file's default of a key (a fresh copy when it is a list or an object)."""
    return copy.deepcopy(SECTIONS[section][name].default)


# ---------------------------------------------------------------------------------------------
# ranges and choices
# ---------------------------------------------------------------------------------------------

def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def expected_range(spec: KeySpec) -> str:
    """``an integer >= 1``, ``a number in [0, 1]``, ``a number > 0``: what a key's range admits."""
    kind = "an integer" if spec.type == "int" else "a number"
    if spec.min is not None and spec.max is not None:
        return f"{kind} in [{_bound(spec.min)}, {_bound(spec.max)}]"
    if spec.above is not None:
        return f"{kind} > {_bound(spec.above)}"
    if spec.min is not None:
        return f"{kind} >= {_bound(spec.min)}"
    if spec.max is not None:
        return f"{kind} <= {_bound(spec.max)}"
    return kind


def in_range(spec: KeySpec, value: float) -> bool:
    if spec.type == "float" and not math.isfinite(value):
        return False
    return ((spec.min is None or value >= spec.min) and (spec.max is None or value <= spec.max)
            and (spec.above is None or value > spec.above))


def check_range(spec: KeySpec, value: Any) -> None:
    """Raise ConfigError when ``value`` (already of the key's type) is outside the key's range or choices.

    ``None`` passes (nullable keys); dtype choices are checked by ``canonical_dtype_name``.
    """
    if value is None:
        return
    if spec.choices is not None and spec.type == "string" and value not in spec.choices:
        raise ConfigError(f"{spec.key} = {value!r} is not supported; use one of: {', '.join(spec.choices)}", spec.key)
    has_range = spec.min is not None or spec.max is not None or spec.above is not None
    if has_range and spec.type in ("int", "float") and not in_range(spec, value):
        why = f" ({spec.hint})" if spec.hint else ""
        raise ConfigError(f"{spec.key} = {value!r} is out of range: expected {expected_range(spec)}{why}", spec.key)


__all__ = [
    "KEYS_FILE",
    "FileFields",
    "RESERVED_ENV_NAMES",
    "RESERVED_ENV_PREFIXES",
    "SECTIONS",
    "SHORT_FORM_KEYS",
    "KeySpec",
    "annotation_of",
    "check_range",
    "config_fields",
    "expected_range",
    "field_default",
    "section_keys",
]
