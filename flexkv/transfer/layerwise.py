"""``from flexkv.transfer.layerwise import build_layerwise_eventfd_socket_path`` (SGLang's ``--enable-flexkv``)."""

from flexkv.adapters.sglang.layerwise import build_layerwise_eventfd_socket_path

__all__ = ["build_layerwise_eventfd_socket_path"]
