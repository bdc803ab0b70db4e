"""A FlexKV connector for vLLM that loses blocks, for tests/vllm_driver.py's ``--drop-last-block``.

vLLM loads it through its own extension point (``"kv_connector_module_path": "vllm_fault_connector"``, the
driver's folder being on sys.path), so the fault comes in as the engine's connector argument rather than
by patching FlexKV's classes. It is FlexKV's connector in every other respect.
"""

from __future__ import annotations

from typing import Any

from flexkv.adapters.vllm import FlexKVConnectorV1
from flexkv.adapters.vllm.scheduler_side import live_schedulers


class LosesLastBlockConnector(FlexKVConnectorV1):
    """Every load loses its last block after the lookup promised it: between vLLM's two scheduler calls
    (get_num_new_matched_tokens, then update_state_after_alloc) the block is dropped from the cache, as an
    eviction by another request would drop it. vLLM must then recompute that block (kv_load_failure_policy
    recompute)."""

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            (side,) = live_schedulers()  # one engine in this process: its scheduler-side connector
            kv = side.kv
            tokens, chain = side.prompt_chain(request)  # the keys the lookup used, made once per request
            cached, _ = kv.lookup(tokens, chain=chain)
            if cached:
                kv.invalidate(tokens, chain=chain, from_token=cached - kv.tokens_per_block)  # the last cached block
        super().update_state_after_alloc(request, blocks, num_external_tokens)
