"""``flexkv.transfer_manager.TransferManagerOnRemote``: the per-node transfer process of a multi-node
deployment. SGLang starts one only with ``--nnodes`` above 1, which FlexKV refuses at start."""

from __future__ import annotations

from typing import Any

from flexkv.core import FlexKVError


class TransferManagerOnRemote:
    @classmethod
    def create_process(cls, master_host: str = "", master_ports: Any = None) -> Any:
        raise FlexKVError("multi-node FlexKV (SGLang --nnodes > 1) is not supported in this version; run one node")
