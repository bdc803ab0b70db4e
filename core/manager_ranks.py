"""The ranks of a KVManager whose engine KV memory is spread over processes: a client of ``flexkv serve``, or
an in-process manager of a model with ``tp_size > 1``.

Then every rank copies its own head slice (``RankAgent``), and launches become orders the dispatcher
(``RankHub``) hands to the ranks: ``flexkv serve`` hosts it for its clients; an in-process manager hosts it
itself, at ``gpu_register_port``. KV memory given to such a manager's ``register_kv_caches`` joins as the rank
of this process.
"""

from __future__ import annotations

import logging
from typing import Any

from .layout import EngineLayout
from .rank_agent import RankAgent
from .rank_hub import RankHub, describe_model, rank_endpoint

logger = logging.getLogger("flexkv")


def rank_port(gpu_register_port: str, server_recv_port: str) -> str:
    """Where a manager's ranks register: the port given, else FlexKV's default beside the server's."""
    return gpu_register_port or rank_endpoint(server_recv_port)


class ManagerRanks:
    def __init__(self, manager: Any, client_mode: bool, instance: int) -> None:
        self.manager = manager
        self.client_mode = client_mode
        self.instance = instance
        self.endpoint = rank_port(manager.gpu_register_port, manager.server_recv_port)
        self.hub: RankHub | None = None
        self.agent: RankAgent | None = None

    @staticmethod
    def needed(client_mode: bool, model_config: Any, external_copies: bool = False) -> bool:
        """Server mode, or ``tp_size > 1`` unless each rank copies through take_external on its own."""
        return client_mode or (model_config.tp_size > 1 and not external_copies)

    def start(self, plane: Any) -> None:
        """Hosts the dispatcher for an in-process plane (a server hosts its own)."""
        if self.client_mode or self.hub is not None:
            return
        m = self.manager
        hub = RankHub(plane, self.endpoint, describe_model(m.model_config, m.cache_config),
                      lease_s=m.server_settings.server_lease_seconds)
        hub.on_layout = self._on_layout
        self.hub = hub.start()
        logger.info("FlexKV: tensor-parallel ranks register at %s", self.endpoint)

    def _on_layout(self, instance: int, layout: int) -> None:
        if instance == self.instance:
            self.manager._layout = layout

    def launch(self, plane: Any, ids: list[int], targets: list[Any], layout: int, layerwise: bool,
               counter_id: int) -> None:
        """A launch whose copies the ranks make: a layer-wise one hands them its layer-done counter."""
        if self.client_mode:
            plane.launch(ids, targets, True, layout, layerwise, counter_id=counter_id)
            return
        if layerwise and self.hub is not None:
            self.hub.note_counter(ids, counter_id)
        plane.launch(ids, targets, True, layout, layerwise)

    def register(self, layout: EngineLayout) -> None:
        """This process's KV memory as a rank (a new registration replaces the last)."""
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        self.agent = RankAgent(self.endpoint, lambda model: layout, instance=self.instance,
                               token=self.manager.server_settings.server_token)

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.hub is not None:
            self.hub.close()
            self.hub = None
