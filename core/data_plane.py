"""A worker process's side of the data plane: copies between its KV memory and a CPU tier that a
KVManager in another process owns (``KVManager.tier_info``, mapped with :func:`.cpu_tier.map_cpu_tier`), as
that manager's scheduler orders them."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from flexkv import _core

from .config import CacheConfig
from .cpu_tier import map_cpu_tier
from .errors import LayoutError
from .gpu_plane import make_gpu_copy_engine
from .layout import EngineLayout


@dataclass
class LayerJobs:
    """A copy that completes layer by layer: ``jobs[i]`` completes layer group ``groups[i]`` (a group is the
    last layer its segments hold)."""

    jobs: list[int]
    groups: np.ndarray


class DataPlane:
    """Maps the CPU tier and copies whole blocks with the host copy threads, or the GPU data plane when
    the KV memory is on a CUDA device. The layout is registered with the copy engine once, here; jobs
    complete in the background and ``poll`` collects them."""

    def __init__(self, tier_info: dict[str, Any], layout: EngineLayout, cache_config: CacheConfig,
                 num_copy_threads: int = 2) -> None:
        if layout.block_bytes != tier_info["block_bytes"]:
            raise LayoutError(f"the engine's KV memory holds {layout.block_bytes} bytes per block, the CPU tier "
                              f"{tier_info['block_bytes']}: the scheduler and the worker disagree on the model's "
                              "KV shape (layers, heads, head size, dtype or block size)")
        layout.validate()
        # The owner hands its memory only to processes of its own user; map_cpu_tier checks that the geometry
        # it announces is tier_info's before mapping it.
        self.region = map_cpu_tier(tier_info)
        self.tier = SimpleNamespace(base=int(self.region.address), num_blocks=int(tier_info["num_blocks"]),
                                    block_stride=int(tier_info["block_stride"]))
        self.layout = layout
        self._per_layer: list[int] | None = None
        t = self.tier
        if layout.is_cuda:
            self.copy, self.layout_id = make_gpu_copy_engine(cache_config, layout, t)
        else:
            self.copy = _core.HostCopyEngine(num_copy_threads)
            self.copy.register_host(t.base, t.num_blocks * t.block_stride)
            try:
                self.layout_id = self.copy.register_layout(layout.segments, layout.num_blocks, t.base,
                                                           t.block_stride, t.num_blocks)
            except ValueError as e:
                raise LayoutError(f"the engine's KV memory does not fit the CPU tier's blocks: {e}") from e

    def submit(self, direction: str, engine_blocks: Any, host_blocks: Any, urgent: bool = False,
               layerwise: bool = False) -> int:
        """Queues a copy of engine_blocks[i] <-> host_blocks[i]; returns a job id. Bad ids raise, nothing
        queued. A ``layerwise`` job completes layer by layer on the GPU (``wait_layer``), as a whole on the
        host copy threads."""
        return int(self.copy.submit(direction, self.layout_id, np.asarray(engine_blocks, dtype=np.int64),
                                    np.asarray(host_blocks, dtype=np.int64), urgent, layerwise))

    def wait_layer(self, job: int, layer: int) -> None:
        """Blocks until ``layer`` of a job is copied (the whole job when it is not layer-wise, or on the host
        copy threads); returns at once for a job that ended, collected by ``poll`` or not."""
        self.copy.wait_group(int(job), int(layer))

    def after_current_stream(self) -> None:
        """On the GPU: the stores queued from now on start only after the work queued so far on the caller's
        current CUDA stream (an engine's forward that writes the blocks they copy). Nothing on the host."""
        if not self.layout.is_cuda:
            return
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        torch.cuda.ExternalStream(int(self.copy.store_stream)).wait_event(event)

    def submit_layers(self, direction: str, engine_blocks: Any, host_blocks: Any) -> LayerJobs:
        """Queues an urgent copy that completes layer by layer (``wait_layer_jobs``): on the GPU one layer-wise job
        (a CUDA event per layer), on the host one job per layer. ``poll`` reports each of ``jobs`` once."""
        if self.layout.is_cuda:
            job = self.submit(direction, engine_blocks, host_blocks, urgent=True, layerwise=True)
            return LayerJobs([job] * len(self._groups()), self._groups())
        engine = np.asarray(engine_blocks, dtype=np.int64)
        host = np.asarray(host_blocks, dtype=np.int64)
        jobs = [int(self.copy.submit(direction, layout_id, engine, host, True)) for layout_id in self._layer_layouts()]
        return LayerJobs(jobs, self._groups())

    def wait_layer_jobs(self, jobs: LayerJobs, layer: int) -> None:
        """Returns once ``layer`` of the copy is in the engine's memory (on the GPU: makes the current CUDA
        stream wait for it instead)."""
        i = min(int(np.searchsorted(jobs.groups, layer)), len(jobs.groups) - 1)
        if self.layout.is_cuda:
            import torch

            self.copy.stream_wait_group(jobs.jobs[i], int(jobs.groups[i]), torch.cuda.current_stream().cuda_stream)
        else:
            self.copy.wait_group(jobs.jobs[i], 0)

    def _groups(self) -> np.ndarray:
        return np.unique(self.layout.grouped_segments()[:, 4])

    def _layer_layouts(self) -> list[int]:
        """The host engine's layout of each layer group's segments alone, registered on first use."""
        if self._per_layer is None:
            seg = self.layout.grouped_segments()
            t = self.tier
            self._per_layer = [self.copy.register_layout(np.ascontiguousarray(seg[seg[:, 4] == g, :4]),
                                                         self.layout.num_blocks, t.base, t.block_stride, t.num_blocks)
                               for g in self._groups()]
        return self._per_layer

    def poll(self, timeout_us: int = 0) -> list[tuple[int, str]]:
        """Jobs that have ended since the last poll, with their error ("" when they succeeded); waits up to
        timeout_us for the first."""
        done = []
        completion = self.copy.next_completion(timeout_us)
        while completion is not None:
            job, _tag, error = completion
            done.append((int(job), error))
            completion = self.copy.next_completion(0)
        return done

    def close(self) -> None:
        """Waits for the jobs in flight, then unmaps the CPU tier."""
        self.copy.close()  # a GPU engine unpins the tier before it is unmapped
        self.region.close()
