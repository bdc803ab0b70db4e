"""``flexkv.transfer.layerwise.build_layerwise_eventfd_socket_path``: the unix socket at which SGLang's
layer-wise mode hands FlexKV its per-layer eventfds. SGLang asks for it on every rank, also with the mode
off; with ``FLEXKV_ENABLE_LAYERWISE_TRANSFER=1`` on the rank that runs the control plane, the server that
answers the handshake (``layerwise_server.py``) is started here, before SGLang connects."""

from __future__ import annotations

import os
from typing import Any

from flexkv.core import manager_with_model


def build_layerwise_eventfd_socket_path(dp_client_id: int = 0, pp_rank: int = 0, model_config: Any = None) -> str:
    base = os.environ.get("FLEXKV_LAYERWISE_EVENTFD_SOCKET", "/tmp/flexkv_layerwise")
    path = f"{base}_{os.getpid()}_dp{dp_client_id}_pp{pp_rank}.sock"
    if int(os.environ.get("FLEXKV_ENABLE_LAYERWISE_TRANSFER", "0") or 0):
        manager = manager_with_model(model_config) if model_config is not None else None
        if manager is not None:
            from .layerwise_server import serve_layerwise

            serve_layerwise(path, manager)
    return path
