"""``flexkv.transfer.layerwise.build_layerwise_eventfd_socket_path``: the socket at which SGLang's layer-wise
mode would hand FlexKV its per-layer eventfds. SGLang asks for it even when the mode is off; the mode
itself is refused at start (``FLEXKV_ENABLE_LAYERWISE_TRANSFER``) in this version."""

from __future__ import annotations

import os
from typing import Any


def build_layerwise_eventfd_socket_path(dp_client_id: int = 0, pp_rank: int = 0, model_config: Any = None) -> str:
    base = os.environ.get("FLEXKV_LAYERWISE_EVENTFD_SOCKET", "/tmp/flexkv_layerwise")
    return f"{base}_{os.getpid()}_dp{dp_client_id}_pp{pp_rank}.sock"
