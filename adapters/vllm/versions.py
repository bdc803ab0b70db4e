"""The vLLM versions this adapter supports."""

from __future__ import annotations

import re

from flexkv.core import ConfigError

TESTED = (0, 32)  # end-to-end tests run on vLLM 0.32 (its CPU build)
OLDEST = (0, 17)  # the KV connector V1 API with FlexKVConnectorV1 built in


def check_vllm_version(version: str) -> None:
    """Raises ConfigError for a vLLM older than the connector API this adapter speaks."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        return  # a development build: nothing to compare
    found = (int(m.group(1)), int(m.group(2)))
    if found < OLDEST:
        raise ConfigError(f"vLLM {version} is too old for FlexKV's connector: it needs vLLM >= "
                          f"{OLDEST[0]}.{OLDEST[1]} (tested with {TESTED[0]}.{TESTED[1]}); upgrade vLLM")
