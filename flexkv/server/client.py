"""``from flexkv.server.client import KVTPClient`` (SGLang's ``--enable-flexkv``)."""

from flexkv.adapters.sglang.tp_client import KVTPClient

__all__ = ["KVTPClient"]
