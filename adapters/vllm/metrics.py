"""FlexKV in vLLM's own ``/metrics`` and stats log line, through vLLM 0.32's KV connector stats hooks.

vLLM asks the scheduler-side connector for ``get_kv_connector_stats()`` after every step; the object
(``FlexKVConnectorStats``) travels as its ``data`` dict to vLLM's stat loggers, which rebuild it with the
connector class's ``build_kv_connector_stats`` and hand it to ``build_prom_metrics``' object
(``FlexKVPromMetrics``) for Prometheus and to ``reduce()`` for the periodic "KV Transfer metrics" line.

What is sent is what the control plane counted since it was last read (``StatsDelta``): counter and
histogram differences, and the tier usage and queue depths as they are now. It is read at an engine step at
most every 0.5 s (1 s from a `flexkv serve`): a read costs a tenth of a millisecond or more, which every
step would pay on the engine's thread, while vLLM logs and exports its stats every few seconds. What
happened since the last read reaches vLLM with the next read, that is with a step after the interval.
Nothing is counted twice: the numbers are the control plane's (core/metrics.py reads the same ones for
``flexkv stats``), plus the connector's own hit tokens and failures.

vLLM looks the hooks up on the connector class it was configured with: the metrics show with
``"kv_connector_module_path": "flexkv.adapters.vllm"`` (this package's ``FlexKVConnectorV1``); vLLM's
built-in ``FlexKVConnectorV1`` forwards ``get_kv_connector_stats`` but not the two class hooks.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from flexkv.core import BYTE_PATHS, plane_snapshot, tier_rows

logger = logging.getLogger("flexkv")

# Per-tier counters sent as differences: (data key, metric, help).
TIER_COUNTERS = (("hit_blocks", "hit_tokens", "tokens found in the tier (SSD: found only there)"),
                 ("miss_blocks", "miss_tokens", "tokens the tier did not have (SSD: nor the CPU tier)"),
                 ("stored_blocks", "stored_blocks", "blocks stored into the tier"),
                 ("evicted_blocks", "evicted_blocks", "blocks evicted from the tier"),
                 ("verification_failures", "verification_failures", "blocks that failed verification (a miss)"),
                 ("read_errors", "read_errors", "I/O errors reading the tier"),
                 ("write_errors", "write_errors", "I/O errors writing the tier"))
TIER_GAUGES = (("capacity_blocks", "blocks the tier can hold"), ("used_blocks", "blocks the tier holds"),
               ("locked_blocks", "blocks tasks hold locked"))
LATENCY_OPS = ("get_match", "load", "store", "promotion", "write_through")


class FlexKVConnectorStats(KVConnectorStats):
    """``data``: ``counters`` (differences; "name" or "name|label"), ``gauges`` (values now), ``histograms``
    (op -> per-bucket count differences and sum), ``bounds`` (the buckets' upper bounds, seconds)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"counters": {}, "gauges": {}, "histograms": {}, "bounds": []}

    def is_empty(self) -> bool:
        d = self.data
        return not any(d["counters"].values()) and not any(h["count"] for h in d["histograms"].values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        o = other.data
        if not o or "counters" not in o:
            return self
        counters = self.data["counters"]
        for k, v in o["counters"].items():
            counters[k] = counters.get(k, 0) + v
        self.data["gauges"].update(o["gauges"])  # the latest values
        for op, h in o["histograms"].items():
            mine = self.data["histograms"].get(op)
            if mine is None:
                self.data["histograms"][op] = {"counts": list(h["counts"]), "sum": h["sum"], "count": h["count"]}
            else:
                mine["counts"] = [a + b for a, b in zip(mine["counts"], h["counts"])]
                mine["sum"] += h["sum"]
                mine["count"] += h["count"]
        self.data["bounds"] = self.data["bounds"] or o["bounds"]
        return self

    def reduce(self) -> dict[str, int | float]:
        c = self.data["counters"]
        query = c.get("query_tokens", 0)
        out: dict[str, int | float] = {
            "flexkv_hit_rate": round(c.get("hit_tokens", 0) / query, 4) if query else 0.0,
            "flexkv_hit_tokens": c.get("hit_tokens", 0),
            "flexkv_stored_tokens": c.get("stored_tokens", 0),
            "flexkv_failures": c.get("connector_failures", 0),
        }
        load = self.data["histograms"].get("load")
        if load and load["count"]:
            out["flexkv_load_avg_ms"] = round(1e3 * load["sum"] / load["count"], 3)
        for k, v in sorted(self.data["gauges"].items()):
            if k.startswith("used_blocks|"):
                out[f"flexkv_{k.replace('|', '_')}"] = v
        return out


class StatsDelta:
    """The scheduler side's view of the control plane since the last step: ``take()`` answers None when
    nothing was counted since (cheap: one read of the counters)."""

    def __init__(self, kv: Any, connector: Any) -> None:
        self.kv, self.connector = kv, connector
        self._last: dict[str, Any] | None = None
        self._last_counters: dict[str, int] | None = None
        self._last_connector = (0, 0, 0)
        self._first = True
        self._read_at = float("-inf")

    # vLLM asks every step; the control plane is read at most this often (a `flexkv serve`: each read is a round
    # trip). What happened in between is in the next delta.
    MIN_INTERVAL_S = 0.5
    SERVER_MIN_INTERVAL_S = 1.0

    def take(self) -> FlexKVConnectorStats | None:
        """None when nothing was counted, when read less than the interval ago, or when the control plane
        cannot be read (a server that is gone): statistics never fail a step of the engine."""
        cp = self.kv.control_plane
        if cp is None or cp.closed:
            return None
        now = time.monotonic()
        interval = self.SERVER_MIN_INTERVAL_S if self.kv.server_client_mode else self.MIN_INTERVAL_S
        if now - self._read_at < interval:
            return None
        self._read_at = now
        try:
            return self._take(cp)
        except Exception as e:
            logger.warning("FlexKV: the control plane's counters are unavailable for vLLM's metrics: %s", e)
            return None

    def _take(self, cp: Any) -> FlexKVConnectorStats | None:
        counters = dict(cp.counters())
        own = (self.connector.hit_tokens, self.connector.stored_tokens, self.connector.misses.count)
        if counters == self._last_counters and own == self._last_connector and not self._first:
            return None
        snap = plane_snapshot(cp)
        prev, self._last, self._last_counters = self._last, snap, counters
        prev_own, self._last_connector = self._last_connector, own
        self._first = False
        return FlexKVConnectorStats(data=_difference(prev, snap, self.kv.tokens_per_block, own, prev_own))


def _difference(prev: dict[str, Any] | None, snap: dict[str, Any], tpb: int, own: tuple[int, int, int],
                prev_own: tuple[int, int, int]) -> dict[str, Any]:
    c, p = snap["counters"], prev["counters"] if prev else {}
    rows, prows = tier_rows(snap, tpb), tier_rows(prev, tpb) if prev else {}
    counters: dict[str, int] = {
        "query_tokens": (c["get_query_blocks"] - p.get("get_query_blocks", 0)) * tpb,
        "hit_tokens": (c["get_hit_blocks"] - p.get("get_hit_blocks", 0)) * tpb,
        "stored_tokens": (c["put_stored_blocks"] - p.get("put_stored_blocks", 0)) * tpb,
        "tasks_failed": c["tasks_failed"] - p.get("tasks_failed", 0),
        "connector_hit_tokens": own[0] - prev_own[0],
        "connector_stored_tokens": own[1] - prev_own[1],
        "connector_failures": own[2] - prev_own[2],
    }
    for key, src, dst in BYTE_PATHS:
        counters[f"bytes|{src}|{dst}"] = c.get(key, 0) - p.get(key, 0)
    gauges: dict[str, int] = {}
    for tier, row in rows.items():
        before = prows.get(tier, {})
        for key, _, _ in TIER_COUNTERS:
            scale = tpb if key in ("hit_blocks", "miss_blocks") else 1
            counters[f"{key}|{tier}"] = (row[key] - before.get(key, 0)) * scale
        for key, _ in TIER_GAUGES:
            gauges[f"{key}|{tier}"] = row[key]
    for queue, depth in snap["gauges"].items():
        gauges[f"queue|{queue}"] = depth
    hists: dict[str, Any] = {}
    bounds: list[float] = []
    for op in LATENCY_OPS:
        h = snap["histograms"].get(op)
        if h is None:
            continue
        bounds = list(h["bounds"])
        ph = prev["histograms"][op] if prev else {"counts": [0] * len(h["counts"]), "sum": 0.0, "count": 0}
        hists[op] = {"counts": [a - b for a, b in zip(h["counts"], ph["counts"])], "sum": h["sum"] - ph["sum"],
                     "count": h["count"] - ph["count"]}
    return {"counters": counters, "gauges": gauges, "histograms": hists, "bounds": bounds}


class FlexKVPromMetrics(KVConnectorPromMetrics):
    """FlexKV's series in vLLM's registry, named ``vllm:flexkv_*``, labelled like vLLM's own (model, engine)
    plus ``tier`` / ``src``, ``dst`` / ``queue`` / ``op``."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, Any] = {}
        self._gauges: dict[str, Any] = {}
        self._children: dict[tuple[str, int, tuple[str, ...]], Any] = {}
        for _, metric, doc in TIER_COUNTERS:
            self._counter(f"tier_{metric}", f"FlexKV: {doc}", ["tier"])
        for name, doc in (("query_tokens", "tokens vLLM asked FlexKV for"),
                          ("hit_tokens", "tokens FlexKV found (any tier)"),
                          ("stored_tokens", "tokens stored into FlexKV"),
                          ("tasks_failed", "FlexKV tasks that failed"),
                          ("connector_hit_tokens", "tokens the connector told vLLM to load"),
                          ("connector_stored_tokens", "tokens the connector stored"),
                          ("connector_failures", "lookups, loads and stores that failed (a miss, a skipped store)")):
            self._counter(name, f"FlexKV: {doc}", [])
        self._counter("transfer_bytes", "FlexKV: bytes moved, per path and direction", ["src", "dst"])
        for name, doc in TIER_GAUGES:
            self._gauge(f"tier_{name}", f"FlexKV: {doc}", ["tier"])
        self._gauge("queue_depth", "FlexKV: tasks, promotions and write-throughs waiting", ["queue"])
        self._histograms: dict[str, Any] = {}
        self._bounds: list[float] | None = None

    def _counter(self, name: str, doc: str, extra: list[str]) -> None:
        self._counters[name] = self._counter_cls(name=f"vllm:flexkv_{name}", documentation=doc,
                                                 labelnames=[*self._labelnames, *extra])

    def _gauge(self, name: str, doc: str, extra: list[str]) -> None:
        self._gauges[name] = self._gauge_cls(name=f"vllm:flexkv_{name}", documentation=doc,
                                             labelnames=[*self._labelnames, *extra], multiprocess_mode="mostrecent")

    def _child(self, metric: Any, name: str, engine_idx: int, extra: tuple[str, ...]) -> Any:
        key = (name, engine_idx, extra)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*self.per_engine_labelvalues[engine_idx], *extra)
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        if not d or "counters" not in d:
            return
        for key, value in d["counters"].items():
            if value <= 0:
                continue
            name, *labels = key.split("|")
            metric = "transfer_bytes" if name == "bytes" else f"tier_{_TIER_METRIC[name]}" if labels else name
            self._child(self._counters[metric], metric, engine_idx, tuple(labels)).inc(value)
        for key, value in d["gauges"].items():
            name, label = key.split("|", 1)
            metric = "queue_depth" if name == "queue" else f"tier_{name}"
            self._child(self._gauges[metric], metric, engine_idx, (label,)).set(value)
        if d["bounds"] and self._bounds is None:
            self._bounds = list(d["bounds"])
            self._histogram = self._histogram_cls(name="vllm:flexkv_latency_seconds",
                                                  documentation="FlexKV: latency of matches, loads, stores, "
                                                  "promotions and write-throughs (sums from bucket midpoints)",
                                                  buckets=self._bounds, labelnames=[*self._labelnames, "op"])
        for op, h in d["histograms"].items():
            child = self._child(self._histogram, "latency", engine_idx, (op,))
            for value, n in zip(_representatives(self._bounds), h["counts"]):
                for _ in range(n):  # one observation per load / store: never per block
                    child.observe(value)


_TIER_METRIC = {key: metric for key, metric, _ in TIER_COUNTERS}


def _representatives(bounds: list[float]) -> list[float]:
    """A value inside each bucket (the geometric middle; twice the last bound for +Inf)."""
    out, lower = [], bounds[0] / 2
    for b in bounds:
        out.append(math.sqrt(lower * b))
        lower = b
    return [*out, 2 * bounds[-1]]


__all__ = ["FlexKVConnectorStats", "FlexKVPromMetrics", "StatsDelta"]
