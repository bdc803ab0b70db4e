"""``flexkv.integration.config.FlexKVConfig``: the config SGLang's ``--enable-flexkv`` reads.

SGLang's in-tree connector (``sglang/srt/mem_cache/storage/flexkv/flexkv_connector.py``) calls
``FlexKVConfig.from_env()`` (the JSON or YAML at ``FLEXKV_CONFIG_PATH``, which SGLang sets from
``--flexkv-config-file``), then ``post_init_from_sglang_config(...)`` with its model config and server
args, and builds a ``KVManager`` from ``model_config``, ``cache_config``, ``server_recv_port`` and
``gpu_register_port``. This module fills those from SGLang's settings and refuses, with the flag to
change, what FlexKV cannot serve. With ``--tp-size N`` the model config has ``tp_size`` N: TP rank 0's
KVManager hosts the rank dispatcher at ``gpu_register_port`` and every rank (``KVTPClient``, tp rank =
SGLang's ``local_rank``) copies its own head slice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from flexkv.core import CacheConfig, ConfigError, ModelConfig, block_size_for_engine, load_config
from flexkv.core import FlexKVConfig as FileConfig

from .versions import check_sglang_version

logger = logging.getLogger("flexkv")


class SglangModelConfig(ModelConfig):
    """A ModelConfig with what SGLang's connector reads besides the KV shape. The fingerprint names the
    model and SGLang's buffer layout, so no other model or engine shares its blocks."""

    def __init__(self, *, model_name: str, **shape: Any) -> None:
        super().__init__(**shape)
        self.model_name = model_name
        self.nnodes = 1
        self.master_host = os.environ.get("FLEXKV_MASTER_HOST", "localhost")
        self.master_ports = tuple(os.environ.get("FLEXKV_MASTER_PORTS", "5556,5557,5558").split(","))
        self.tp_size_per_node = 1
        self.pp_size = 1
        self.attn_tp_size = 1
        self.attn_cp_size = 1

    def fingerprint(self) -> str:
        return super().fingerprint() + ";engine=sglang-token-pool;model=" + json.dumps(self.model_name)

    def __str__(self) -> str:
        return f"{self.model_name} ({super().fingerprint()})"


@dataclass
class RankInfo:
    model_config: SglangModelConfig
    pp_rank: int = 0
    attn_tp_rank: int = 0
    attn_cp_rank: int = 0
    pp_size_per_node: int = 1
    dp_client_id: int = 0
    local_rank: int = 0
    node_rank: int = 0
    num_layers_per_pp_stage: int = 0
    tp_rank_per_node: int = 0


def _get(obj: Any, name: str, default: Any) -> Any:
    value = getattr(obj, name, default)
    return default if value is None else value


class FlexKVConfig:
    def __init__(self, file_config: FileConfig) -> None:
        self.cache_config: CacheConfig = dataclasses.replace(file_config.cache_config)
        self.cache_config.enable_kv_sharing = False  # SGLang reads it; FlexKV has no cross-instance sharing
        self.model_config: SglangModelConfig | None = None
        self.server_recv_port = file_config.server_recv_port
        self.gpu_register_port = f"{self.server_recv_port}_gpu_register"

    @classmethod
    def from_env(cls) -> FlexKVConfig:
        """The config at ``FLEXKV_CONFIG_PATH`` (FlexKV's defaults without it), with ``FLEXKV_*`` overrides."""
        return cls(load_config())

    def post_init_from_sglang_config(self, sglang_config: Any, server_args: Any, page_size: int, tp_rank: int = 0,
                                     pp_rank: int = 0, dp_rank: int | None = 0, attn_cp_rank: int = 0) -> RankInfo:
        """Fills the model shape and block size from SGLang; returns this rank's RankInfo."""
        check_sglang_version()
        self._refuse_unsupported(server_args)
        self.cache_config.tokens_per_block = block_size_for_page(self.cache_config.tokens_per_block, int(page_size))
        num_layers = int(_get(sglang_config, "num_hidden_layers", 0))
        arch = getattr(getattr(sglang_config, "attention_arch", None), "name", "")
        use_mla = arch == "MLA"
        if use_mla:
            heads, head_size = 1, int(sglang_config.kv_lora_rank) + int(sglang_config.qk_rope_head_dim)
        else:
            get_heads = getattr(sglang_config, "get_num_kv_heads", None)
            heads = int(get_heads(1)) if callable(get_heads) else int(sglang_config.num_key_value_heads)
            head_size = int(sglang_config.head_dim)
        kv_dtype = str(_get(server_args, "kv_cache_dtype", "auto"))
        dtype = sglang_config.dtype if kv_dtype in ("auto", "") else kv_dtype
        tp_size = int(_get(server_args, "tp_size", 1))
        if not use_mla and heads % tp_size:
            raise ConfigError(f"--tp-size {tp_size}: the model's {heads} KV heads do not split evenly over the "
                              "ranks; FlexKV stores each rank's head slice of a block, so use a --tp-size that "
                              "divides the KV heads", "tp_size")
        self.model_config = SglangModelConfig(model_name=str(_get(server_args, "model_path", "")),
                                              num_layers=num_layers, num_kv_heads=heads, head_size=head_size,
                                              use_mla=use_mla, dtype=dtype, tp_size=tp_size)
        self.model_config.attn_tp_size = self.model_config.tp_size_per_node = tp_size
        self.model_config.validate()
        return RankInfo(model_config=self.model_config, pp_rank=pp_rank, attn_tp_rank=tp_rank,
                        attn_cp_rank=attn_cp_rank, dp_client_id=0, local_rank=tp_rank,
                        num_layers_per_pp_stage=num_layers, tp_rank_per_node=tp_rank)

    @staticmethod
    def _refuse_unsupported(server_args: Any) -> None:
        for name in ("pp_size", "nnodes", "attn_cp_size"):
            value = int(_get(server_args, name, 1))
            if value != 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {value}: FlexKV's --enable-flexkv serves tensor-parallel ranks of one "
                                  f"node (--tp-size) in this version, not {flag}; use {flag} 1, or "
                                  "--enable-hierarchical-cache with FlexKV's HiCache storage backend", name)
        if _get(server_args, "enable_dp_attention", False):
            raise ConfigError("--enable-dp-attention: not supported with --enable-flexkv in this version",
                              "enable_dp_attention")


def block_size_for_page(tokens_per_block: int, page_size: int) -> int:
    """A FlexKV block is one SGLang page (the core's one rule for every engine: block_size_for_engine)."""
    return block_size_for_engine(CacheConfig(tokens_per_block=tokens_per_block), page_size, "SGLang",
                                 "--page-size").tokens_per_block
    if page_size % tokens_per_block and tokens_per_block % page_size:
        raise ConfigError(f"cache_config.tokens_per_block = {tokens_per_block} and SGLang's --page-size "
                          f"{page_size}: one must be a multiple of the other, as a FlexKV block is one SGLang page; "
                          f"set tokens_per_block to {page_size}", "cache_config.tokens_per_block")
    logger.warning("FlexKV: tokens_per_block %d from the config is replaced by SGLang's page size %d: a FlexKV "
                   "block is one SGLang page%s", tokens_per_block, page_size,
                   " (page size 1 makes every block one token; --page-size 16 or more moves KV far faster)"
                   if page_size == 1 else "")
    return page_size
