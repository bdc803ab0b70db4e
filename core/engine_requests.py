"""What every engine adapter's scheduler side does the same way, written once:

- :func:`block_size_for_engine`: a FlexKV block is one engine block (vLLM block, SGLang page, TensorRT-LLM
  block); a ``tokens_per_block`` that divides or is a multiple of the engine's gives way to it, with a
  warning; any other is an error naming the key;
- :func:`request_namespace`: requests share cached blocks only within one cache salt, one LoRA adapter and
  one tenant;
- :class:`RequestTasks`: which task a request holds for what, and how a task a failed step left behind is
  ended (its blocks unlocked);
- :class:`Misses`: a failure inside FlexKV is a miss or a store skipped for the engine, logged and counted.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from .config import CacheConfig
from .errors import ConfigError, TaskError

logger = logging.getLogger("flexkv")


def block_size_for_engine(cache_config: CacheConfig, engine_block: int, engine: str,
                          block_key: str = "block_size") -> CacheConfig:
    """``cache_config`` with ``tokens_per_block`` set to the engine's block size. ``engine`` names the engine
    and ``block_key`` its setting (``"vLLM"``, ``"--block-size"``) in the messages."""
    tpb = cache_config.tokens_per_block
    if engine_block < 1:
        raise ConfigError(f"{engine}'s {block_key} is {engine_block}; it must be at least 1", block_key)
    if tpb == engine_block:
        return cache_config
    if engine_block % tpb and tpb % engine_block:
        raise ConfigError(f"cache_config.tokens_per_block = {tpb} and {engine}'s {block_key} = {engine_block}: one "
                          f"must be a multiple of the other, as a FlexKV block is one {engine} block; set "
                          f"tokens_per_block to {engine_block}", "cache_config.tokens_per_block")
    logger.warning("FlexKV: tokens_per_block %d from the config is replaced by %s's %s %d: a FlexKV block is one "
                   "%s block%s", tpb, engine, block_key, engine_block, engine,
                   " (a block of one token moves KV slowly; 16 or more is far faster)" if engine_block == 1 else "")
    return dataclasses.replace(cache_config, tokens_per_block=engine_block)


def request_namespace(cache_salt: Any = None, lora: Any = None, tenant: Any = None) -> tuple[str, ...]:
    """The salts of a request's blocks, in one fixed order; None and "" add nothing."""
    parts = []
    for tag, value in (("salt", cache_salt), ("lora", lora), ("tenant", tenant)):
        if value is not None and value != "":
            parts.append(f"{tag}:{value}")
    return tuple(parts)


class Misses:
    """Counts and logs the failures an engine never sees: each one is a miss or a store skipped."""

    def __init__(self) -> None:
        self.count = 0

    def failed(self, what: str, request_id: Any, error: BaseException | str) -> None:
        self.count += 1
        action = "the store is skipped" if what == "store" else "served as a miss"
        logger.warning("FlexKV: %s for request %s failed, %s: %s", what, request_id, action, error)


class RequestTasks:
    """Request id -> the task it holds for one purpose (a load, a store, a prefetch).

    ``drop`` ends a request's task that will not be launched or reported: it is cancelled if it was never
    claimed, ended as failed if another process had taken it; either way its blocks are unlocked.
    """

    def __init__(self, kv: Any, purpose: str) -> None:
        self.kv = kv
        self.purpose = purpose
        self._tasks: dict[Any, int] = {}

    def __contains__(self, request_id: Any) -> bool:
        return request_id in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, request_id: Any) -> int | None:
        return self._tasks.get(request_id)

    def hold(self, request_id: Any, task: int) -> None:
        self._tasks[request_id] = task

    def pop(self, request_id: Any) -> int | None:
        return self._tasks.pop(request_id, None)

    def items(self) -> list[tuple[Any, int]]:
        return list(self._tasks.items())

    def drop(self, request_id: Any) -> None:
        end_task(self.kv, self._tasks.pop(request_id, None))


def end_task(kv: Any, task: int | None) -> None:
    """Ends a task a failed or abandoned step left behind, so its blocks are unlocked; never raises."""
    if task is None:
        return
    try:
        try:
            kv.finish_external(task, False, "abandoned")
        except TaskError:  # not taken by another process: never launched
            kv.cancel(task)
            kv.try_wait(task)  # nobody waits for it: collect it now if it ended, else its table entry stays
    except Exception as e:
        logger.warning("FlexKV: ending task %d failed: %s", task, e)
