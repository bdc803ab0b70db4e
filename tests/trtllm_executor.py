"""A miniature of TensorRT-LLM 1.2's PyTorch executor, as far as it drives a KV cache connector.

It calls the connector in the order TensorRT-LLM's source does (release 1.2 line):

- ``_torch/pyexecutor/py_executor_creator.py``: ``worker_cls(llm_args)`` on every rank and
  ``scheduler_cls(llm_args)`` on rank 0;
- ``_torch/pyexecutor/py_executor.py`` ``PyExecutor._maybe_init_kv_connector_manager``:
  ``worker.register_kv_caches(kv_cache_manager.get_unique_primary_pool())`` once;
- per iteration of ``PyExecutor._executor_loop``:
  1. ``KVCacheManager.prepare_resources`` (``_torch/pyexecutor/resource_manager.py``): for a context
     request's first chunk, C++ ``BlockManager::addSequence`` matches the on-device prefix, calls
     ``get_num_new_matched_tokens(request, num_computed_tokens)``, allocates every prompt block, and then
     ``update_state_after_alloc(request, get_cache_indices(request))``;
     ``KvCacheConnectorManager.build_scheduler_output`` reports new and cached requests, leaving out
     requests that load asynchronously;
  2. ``_kv_connector_start_batch``: ``take_scheduled_requests_pending_load`` takes asynchronously loading
     requests out of the batch, ``handle_metadata`` runs ``build_connector_meta`` on rank 0, broadcasts
     the result (pickled) and calls ``bind_connector_meta`` on every worker, then
     ``worker.start_load_kv(stream)``;
  3. ``_forward_step``: forward hooks on each decoder layer call ``wait_for_layer_load(i, stream)``
     before and ``save_kv_layer(i, stream)`` after the layer; then ``wait_for_save(stream)``;
  4. ``_handle_responses`` → ``_terminate_request``: ``request_finished(request, get_cache_indices(request))``;
     True pins the blocks (``store_blocks_for_reuse(pin_blocks=True)``) until the connector reports the
     request as saved; the sequence is freed either way;
  5. ``_kv_connector_terminate_requests`` every iteration: ``worker.get_finished(new saving ids, new loading
     ids)`` (each id passed once); saved requests' blocks are unpinned, loaded requests go back to
     ``CONTEXT_INIT`` and are scheduled again without a second allocation.

The "model" writes, for every token position and layer, K and V bytes that are a function of the token
prefix, so a block holds the right bytes exactly when it was computed or loaded for the same prefix. Each
layer checks, before it computes, that the prompt's earlier blocks hold the right bytes for that layer.

Tensor parallelism (``comm`` with several ranks, one executor per rank process): as TensorRT-LLM's
``KvCacheConnectorManager`` does, the scheduler connector lives on rank 0 only and its answers
(``get_num_new_matched_tokens``, ``request_finished``, the connector metadata) are broadcast to every rank;
``update_state_after_alloc`` runs on rank 0; each rank's ``get_finished`` results are all-gathered and a
request's transfer ends once every rank has reported it. Each rank's pool holds its own head slice: the
model's bytes depend on the rank too.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

POISON = 0x5A


@dataclass
class RequestData:  # tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py
    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[RequestData] = field(default_factory=list)
    cached_requests: list[RequestData] = field(default_factory=list)


class Request:
    """The LlmRequest attributes connectors read: request_id, prompt_len, get_tokens(beam)."""

    def __init__(self, request_id: int, prompt: list[int], max_new_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.is_dummy_request = False
        self.context_current_position = 0
        self.state = "CONTEXT_INIT"
        self.block_ids: list[int] = []
        self.reported = False
        self.loaded_tokens = 0

    def get_tokens(self, beam: int) -> list[int]:
        assert beam == 0
        return list(self.tokens)

    @property
    def is_finished(self) -> bool:
        return len(self.tokens) - self.prompt_len >= self.max_new_tokens


class SingleRank:
    """The executor's communicator with one rank (TensorRT-LLM's mpi_broadcast / mpi_allgather)."""

    rank, size = 0, 1

    def broadcast(self, obj: Any) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]


def kv_bytes(prefix: tuple[int, ...], layer: int, nbytes: int, rank: int = 0) -> np.ndarray:
    """The K and V bytes of the last token of `prefix` at `layer` in TP rank `rank`'s heads (a stand-in for
    attention's output)."""
    key = (prefix, layer) if rank == 0 else (prefix, layer, rank)
    seed = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(seed, "little")).integers(0, 256, nbytes, dtype=np.uint8)


class MiniExecutor:
    def __init__(self, scheduler: Any, worker: Any, *, num_blocks: int, num_layers: int, tokens_per_block: int,
                 heads_x_dim: int, device: str = "cpu", chunk_tokens: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, comm: Any = None) -> None:
        self.scheduler, self.worker = scheduler, worker  # scheduler: rank 0's, None on the other ranks
        self.comm = comm if comm is not None else SingleRank()
        self.reports: list[tuple[set[int], set[int]]] = [(set(), set()) for _ in range(self.comm.size)]
        self.tpb = tokens_per_block
        self.num_layers = num_layers
        self.chunk_tokens = chunk_tokens  # context chunk size (chunked prefill), None: whole prompt
        self.device = device
        self.pool = torch.full((num_blocks, num_layers, 2, tokens_per_block * heads_x_dim), 0, dtype=dtype,
                               device=device)
        self.pool.view(torch.uint8).fill_(POISON)
        self.token_bytes = 2 * heads_x_dim * self.pool.element_size()  # K and V of one token in one layer
        self.free = list(range(num_blocks))
        self.device_cache: dict[tuple[int, ...], int] = {}  # on-device reuse: block prefix -> block id
        self.pinned: dict[int, list[int]] = {}  # request id -> blocks kept for the connector
        self.active: list[Request] = []
        self.loading: dict[int, Request] = {}
        self.new_saving: list[int] = []
        self.new_loading: list[int] = []
        self.finished: list[Request] = []
        self.reported: dict[int, int] = {}  # request id -> tokens already reported in a SchedulerOutput
        self.layer_checks = 0
        self.async_loads = 0
        self.stream = torch.cuda.current_stream() if device.startswith("cuda") else None
        # PyExecutor._maybe_init_kv_connector_manager
        worker.register_kv_caches(self.pool)

    # ---------------------------------------------------------------------------------- blocks

    def evict_device_cache(self) -> None:
        """Drops TensorRT-LLM's own reusable blocks (as memory pressure would) and poisons them."""
        for block in self.device_cache.values():
            self.pool[block].view(torch.uint8).fill_(POISON)
            self.free.append(block)
        self.device_cache.clear()

    def _add_sequence(self, req: Request) -> None:
        """C++ BlockManager::addSequence with the connector (kvCacheManager.cpp)."""
        tpb = self.tpb
        prompt = req.tokens[: req.prompt_len]
        reused = []
        for i in range(len(prompt) // tpb):
            block = self.device_cache.get(tuple(prompt[: (i + 1) * tpb]))
            if block is None or (i + 1) * tpb >= req.prompt_len:
                break
            reused.append(block)
        num_computed = len(reused) * tpb
        need = -(-(req.prompt_len + req.max_new_tokens) // tpb) - len(reused)
        assert len(self.free) >= need, "the test sized the pool too small"
        fresh = [self.free.pop(0) for _ in range(need)]
        for block in fresh:  # poisoned before rank 0 can launch a load into them (the collective below)
            self.pool[block].view(torch.uint8).fill_(POISON)
        matched, is_async = self.comm.broadcast(self.scheduler.get_num_new_matched_tokens(req, num_computed)
                                                if self.comm.rank == 0 else None)
        assert num_computed + matched < req.prompt_len, "at least one prompt token stays uncomputed"
        for block in reused:  # shared with the device cache: not freed with the request
            self.device_cache = {k: v for k, v in self.device_cache.items() if v != block}
        req.block_ids = reused + fresh
        req.context_current_position = num_computed + matched
        req.loaded_tokens = matched
        if self.comm.rank == 0:
            self.scheduler.update_state_after_alloc(req, list(req.block_ids))
        if is_async:
            req.state = "DISAGG_GENERATION_TRANS_IN_PROGRESS"
            self.async_loads += 1

    # ------------------------------------------------------------------------------ iteration

    def add_request(self, req: Request) -> None:
        self.active.append(req)

    def step(self) -> None:
        batch: list[tuple[Request, int, int]] = []  # (request, first position, tokens to compute)
        output = SchedulerOutput()
        for req in list(self.active):
            if req.state == "DISAGG_GENERATION_TRANS_IN_PROGRESS":
                continue
            if not req.block_ids:
                self._add_sequence(req)
                if req.state == "DISAGG_GENERATION_TRANS_IN_PROGRESS":
                    self.loading[req.request_id] = req
                    self.new_loading.append(req.request_id)
                    continue  # build_scheduler_output leaves it out; take_scheduled_requests_pending_load too
            pos = req.context_current_position
            if pos < req.prompt_len:
                left = req.prompt_len - pos
                count = min(left, self.chunk_tokens) if self.chunk_tokens else left
            else:
                pos, count = len(req.tokens) - 1, 1
            if req.request_id not in self.reported:
                data = RequestData(req.request_id, list(req.tokens), list(req.block_ids),
                                   pos - req.loaded_tokens if not req.reported else pos, count)
                output.new_requests.append(data)
                self.reported[req.request_id] = len(req.tokens)
                req.reported = True
            else:
                new = req.tokens[self.reported[req.request_id]:]
                self.reported[req.request_id] = len(req.tokens)
                output.cached_requests.append(RequestData(req.request_id, new, [], pos, count))
            batch.append((req, pos, count))
        if batch:
            meta = self.scheduler.build_connector_meta(output) if self.comm.rank == 0 else None
            self.worker.bind_connector_meta(pickle.loads(self.comm.broadcast(pickle.dumps(meta))))  # MPI broadcast
            self.worker.start_load_kv(self.stream)
            self._forward(batch)
            self.worker.wait_for_save(self.stream)
            self._sample(batch)
        self._handle_responses()
        self._terminate_requests()

    def _forward(self, batch: list[tuple[Request, int, int]]) -> None:
        for layer in range(self.num_layers):
            self.worker.wait_for_layer_load(layer, self.stream)
            for req, pos, count in batch:
                self._check_prefix(req, pos, layer)
                for p in range(pos, pos + count):
                    self.write_kv(req, p, layer)
            self.worker.save_kv_layer(layer, self.stream)

    def _sample(self, batch: list[tuple[Request, int, int]]) -> None:
        for req, pos, count in batch:
            if pos + count >= req.prompt_len:
                req.tokens.append(int(sum(req.tokens[-3:]) % 997 + 3))
            req.context_current_position = pos + count

    def _handle_responses(self) -> None:
        for req in [r for r in self.active if r.is_finished]:
            self.active.remove(req)
            self.finished.append(req)
            keep = self.comm.broadcast(self.scheduler.request_finished(req, list(req.block_ids))
                                       if self.comm.rank == 0 else None)
            tpb = self.tpb
            prompt = req.tokens
            for i, block in enumerate(req.block_ids):  # store_context_blocks: full blocks become reusable
                if (i + 1) * tpb <= len(prompt) - 1:
                    self.device_cache.setdefault(tuple(prompt[: (i + 1) * tpb]), block)
            owned = [b for b in req.block_ids if b not in self.device_cache.values()]
            if keep:
                self.pinned[req.request_id] = owned
                self.new_saving.append(req.request_id)
            else:
                self.free.extend(owned)

    def _terminate_requests(self) -> None:
        saving, loading = self.new_saving, self.new_loading
        self.new_saving, self.new_loading = [], []
        # KvCacheConnectorManager.get_finished: a transfer ends once every rank reported it.
        for (done_s, done_l), (s, ld) in zip(self.reports, self.comm.allgather(self.worker.get_finished(saving,
                                                                                                         loading))):
            done_s.update(s)
            done_l.update(ld)
        saved = sorted(set.intersection(*(r[0] for r in self.reports)))
        loaded = sorted(set.intersection(*(r[1] for r in self.reports)))
        for r in self.reports:
            r[0].difference_update(saved)
            r[1].difference_update(loaded)
        for rid in saved:
            self.free.extend(self.pinned.pop(rid))
        for rid in loaded:
            req = self.loading.pop(rid)
            req.state = "CONTEXT_INIT"
            req.loaded_tokens = 0  # reported later with computed_position past the loaded tokens

    # --------------------------------------------------------------------------------- "model"

    def write_kv(self, req: Request, position: int, layer: int) -> None:
        """Computes the KV of one token position at one layer into the request's engine block (what the
        forward pass does; a test also calls it to give the engine blocks it already holds)."""
        block, offset = req.block_ids[position // self.tpb], position % self.tpb
        data = kv_bytes(tuple(req.tokens[: position + 1]), layer, self.token_bytes, self.comm.rank)
        row = self.pool[block, layer].view(torch.uint8).view(2, self.tpb, -1)
        half = self.token_bytes // 2
        src = torch.from_numpy(data).to(self.device)
        row[0, offset] = src[:half]
        row[1, offset] = src[half:]

    def _check_prefix(self, req: Request, upto: int, layer: int) -> None:
        """Before `layer` computes positions >= upto, every earlier prompt position holds its KV at `layer`."""
        if self.stream is not None:
            self.stream.synchronize()
        row_bytes = self.token_bytes // 2
        for position in range(min(upto, req.prompt_len)):
            block, offset = req.block_ids[position // self.tpb], position % self.tpb
            row = self.pool[block, layer].view(torch.uint8).view(2, self.tpb, -1)
            got = torch.cat([row[0, offset], row[1, offset]]).cpu().numpy()
            want = kv_bytes(tuple(req.tokens[: position + 1]), layer, self.token_bytes, self.comm.rank)
            assert got.nbytes == 2 * row_bytes
            if not np.array_equal(got, want):
                raise AssertionError(f"request {req.request_id}: layer {layer} position {position} (block {block}) "
                                     "does not hold its KV before the layer runs")
        self.layer_checks += 1

    def run(self, timeout: float = 60.0) -> None:
        """Iterates until every request finished and every pinned block was freed (or timeout seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.active and not self.pinned and not self.loading:
                return
            self.step()
            if not any(r.state == "CONTEXT_INIT" for r in self.active):
                time.sleep(0.001)  # only copies are outstanding: the executor loop idles
        raise AssertionError("the executor did not finish its requests")
