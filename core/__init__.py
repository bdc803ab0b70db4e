"""flexkv.core: the facades over FlexKV's control plane (KVManager, PageStore), its config, layouts and tools.

``__all__`` is the API the engine adapters (``flexkv.adapters``) may use; they import nothing else from the
core (tests/test_core_api.py checks it). Everything else here is the core's own business.
"""

from .config import CacheConfig, FlexKVConfig, ModelConfig, canonical_dtype_name
from .config_file import load_config
from .control_plane import FaultInjectingIoEnv
from .data_plane import DataPlane
from .engine_requests import Misses, RequestTasks, block_size_for_engine, end_task, request_namespace
from .errors import ConfigError, FlexKVError, LayoutError, TaskError
from .kv_manager import KeyChain, KVManager
from .layout import EngineLayout, KVCacheLayout, KVCacheLayoutType
from .local_registry import manager_for, manager_with_model
from .log import setup_logging
from .metrics import BYTE_PATHS, plane_snapshot, tier_rows
from .page_store import PageStore
from .rank_agent import RankAgent
from .rank_hub import rank_endpoint
from .request import KVResponse, KVResponseStatus
from .server_launch import ServerSettings
from .task_args import hashes_array
from .wire import ServerError, ServerUnavailable

__all__ = [
    "BYTE_PATHS",
    "CacheConfig",
    "ConfigError",
    "DataPlane",
    "EngineLayout",
    "FaultInjectingIoEnv",
    "FlexKVConfig",
    "FlexKVError",
    "KVCacheLayout",
    "KVCacheLayoutType",
    "KVManager",
    "KeyChain",
    "KVResponse",
    "KVResponseStatus",
    "LayoutError",
    "Misses",
    "ModelConfig",
    "PageStore",
    "RankAgent",
    "RequestTasks",
    "ServerError",
    "ServerSettings",
    "ServerUnavailable",
    "TaskError",
    "block_size_for_engine",
    "canonical_dtype_name",
    "end_task",
    "hashes_array",
    "load_config",
    "manager_for",
    "manager_with_model",
    "rank_endpoint",
    "plane_snapshot",
    "request_namespace",
    "setup_logging",
    "tier_rows",
]
