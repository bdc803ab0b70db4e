"""FlexKV connectors for vLLM with faults, for tests/vllm_driver.py's ``--drop-last-block`` (blocks lost after
the lookup) and ``--late-reports`` (copies seen done late).

vLLM loads it through its own extension point (``"kv_connector_module_path": "vllm_fault_connector"``, the
driver's folder being on sys.path), so the faults come in as the engine's connector argument rather than
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


class LateReportsConnector(FlexKVConnectorV1):
    """Copies are seen done only LAG steps after they are (as a slow GPU -> CPU copy would be): the stores of
    a batch's last steps are still running for vLLM when generate() returns, so only FlexKV's flush at exit
    can keep them. Waits with a timeout (a preempted request's flush, shutdown) see every copy at once."""

    LAG = 16

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        worker = self._impl.worker
        for plane in worker.planes.values():
            if not isinstance(plane.poll, _LatePoll):
                plane.poll = _LatePoll(plane.poll, self.LAG)
        return super().get_finished(finished_req_ids)


class _LatePoll:
    def __init__(self, poll: Any, lag: int) -> None:
        self.poll = poll
        self.lag = lag
        self.held: list[list[tuple[int, str]]] = []

    def __call__(self, timeout_us: int = 0) -> list[tuple[int, str]]:
        self.held.append(self.poll(timeout_us))
        if timeout_us > 0:  # a wait: everything done is seen
            out = [c for batch in self.held for c in batch]
            self.held = []
            return out
        return self.held.pop(0) if len(self.held) > self.lag else []
