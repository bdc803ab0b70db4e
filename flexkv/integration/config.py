"""``from flexkv.integration.config import FlexKVConfig`` (SGLang's ``--enable-flexkv``)."""

from flexkv.adapters.sglang.flexkv_config import FlexKVConfig

__all__ = ["FlexKVConfig"]
