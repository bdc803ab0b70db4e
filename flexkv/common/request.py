"""``flexkv.common.request``: task results."""

from flexkv.core.request import KVResponse, KVResponseStatus

__all__ = ["KVResponse", "KVResponseStatus"]
