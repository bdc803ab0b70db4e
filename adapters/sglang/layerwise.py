"""``flexkv.transfer.layerwise.build_layerwise_eventfd_socket_path``: the unix socket at which SGLang's
layer-wise mode hands FlexKV its per-layer eventfds. SGLang asks for it on every rank, also with the mode
off; with ``FLEXKV_ENABLE_LAYERWISE_TRANSFER=1`` the server that answers the handshake
(``layerwise_server.py``) is started here, before SGLang connects: in every rank process that registered its
KV memory through a RankAgent (tensor parallelism: SGLang calls this after ``register_to_server``), fed by
that rank's own copies; else, with one rank, in the process of the KVManager, fed by its launches."""

from __future__ import annotations

import os
from typing import Any

from flexkv.core import manager_with_model


def build_layerwise_eventfd_socket_path(dp_client_id: int = 0, pp_rank: int = 0, model_config: Any = None) -> str:
    base = os.environ.get("FLEXKV_LAYERWISE_EVENTFD_SOCKET", "/tmp/flexkv_layerwise")
    path = f"{base}_{os.getpid()}_dp{dp_client_id}_pp{pp_rank}.sock"
    if int(os.environ.get("FLEXKV_ENABLE_LAYERWISE_TRANSFER", "0") or 0):
        from .layerwise_server import serve_layerwise, serve_rank_layerwise
        from .tp_client import agent_of

        agent = agent_of(dp_client_id, pp_rank)
        manager = manager_with_model(model_config) if model_config is not None and agent is None else None
        if agent is not None:
            serve_rank_layerwise(path, agent)
        elif manager is not None:
            serve_layerwise(path, manager)
    return path
