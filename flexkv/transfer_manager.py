"""``from flexkv.transfer_manager import TransferManagerOnRemote`` (SGLang's ``--enable-flexkv``)."""

from flexkv.adapters.sglang.multi_node import TransferManagerOnRemote

__all__ = ["TransferManagerOnRemote"]
