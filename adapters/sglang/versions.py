"""The SGLang versions this adapter supports."""

from __future__ import annotations

import re

from flexkv.core import ConfigError

TESTED = (0, 5, 23)  # the tests run SGLang 0.5.23's own classes
OLDEST = (0, 5, 16)  # --enable-flexkv and the HiCache storage API this adapter speaks


def check_sglang_version(version: str | None = None) -> None:
    """Raises ConfigError for an SGLang older than the interfaces this adapter implements."""
    if version is None:
        import sglang

        version = str(getattr(sglang, "__version__", ""))
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if m is None:
        return  # a development build: nothing to compare
    found = tuple(int(g) for g in m.groups())
    if found < OLDEST:
        raise ConfigError(f"SGLang {version} is too old for FlexKV: it needs SGLang >= "
                          f"{'.'.join(map(str, OLDEST))} (tested with {'.'.join(map(str, TESTED))}); upgrade SGLang")
