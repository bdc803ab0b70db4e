"""FlexKV's metrics: what the control plane counts (once, in C++), read as one snapshot and shown as
Prometheus metrics, ``flexkv stats`` rows and a periodic log line.

- ``plane_snapshot(cp)``: the counters, latency histograms, queue depths and index state of a control
  plane (in this process, or a ``flexkv serve`` through its client).
- ``tier_rows(snapshot, tokens_per_block)``: per tier (cpu, ssd, remote) capacity, used, locked, hits,
  misses, hit tokens, stored, evictions, verification failures and I/O errors; the remote tier's circuit
  breakers are in core/remote_metrics.py.
- ``FlexKVCollector``: a prometheus_client collector that reads a snapshot at each scrape (nothing is
  counted in Python, so metrics cost the cache nothing between scrapes).
- ``MetricsServer``: an HTTP endpoint of its own (``metrics_port``) for ``flexkv serve`` or an in-process
  manager.
- ``StatsLogger``: a log line every ``num_log_interval_requests`` requests (or ``log_interval_seconds``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .remote_metrics import (
    REMOTE_BYTE_PATHS,
    collect_remote,
    remote_from_scrape,
    remote_row,
    remote_section,
    server_lines,
    summary_part,
)

logger = logging.getLogger("flexkv")

Snapshot = dict[str, Any]
PREFIX = "flexkv"

# (metric, help) of the per-tier rows; counters end in _total in the exposition.
TIER_GAUGES = (("capacity_blocks", "blocks the tier can hold"), ("used_blocks", "blocks the tier holds"),
               ("locked_blocks", "blocks tasks hold locked"), ("free_blocks", "free blocks"))
TIER_COUNTERS = (("hit_blocks", "blocks of get requests found in the tier (SSD: found only there)"),
                 ("miss_blocks", "blocks of get requests the tier did not have (SSD: nor the CPU tier)"),
                 ("hit_tokens", "tokens of the hit blocks"),
                 ("stored_blocks", "blocks stored into the tier"),
                 ("evicted_blocks", "blocks evicted from the tier"),
                 ("verification_failures", "blocks whose bytes failed verification (dropped, a miss)"),
                 ("read_errors", "I/O errors reading the tier"),
                 ("write_errors", "I/O errors writing the tier"))
# (counter, src, dst) of the bytes moved per path and direction.
BYTE_PATHS = (("load_bytes", "cpu", "engine"), ("store_bytes", "engine", "cpu"),
              ("ssd_read_bytes", "ssd", "cpu"), ("ssd_write_bytes", "cpu", "ssd"))


def plane_snapshot(cp: Any) -> Snapshot:
    """One read of a control plane's counters, histograms, queue depths and indexes, and with a remote tier
    its ``remote`` section (core/remote_metrics.py); ``cp`` is a ``flexkv._core.ControlPlane`` or the client
    of a ``flexkv serve`` (one round trip)."""
    if hasattr(cp, "stats"):  # RemotePlane: the server reads its plane
        s = cp.stats()
        snap = {k: s.get(k, {}) for k in ("counters", "histograms", "gauges", "index")}
        if s.get("remote"):
            snap["remote"] = s["remote"]
        return snap
    snap = {"counters": dict(cp.counters()), "histograms": dict(cp.histograms()), "gauges": dict(cp.gauges()),
            "index": dict(cp.index_counts())}
    remote = remote_section(cp)
    if remote is not None:
        snap["remote"] = remote
    return snap


def queue_depths(snap: Snapshot) -> dict[str, int]:
    """The plane's queue depths, and the remote tier's write-through queue (blocks) when it has one."""
    gauges = dict(snap["gauges"])
    if snap.get("remote"):
        gauges["remote_write_queue_blocks"] = int(snap["remote"].get("write_queue_blocks", 0))
    return gauges


def byte_paths(snap: Snapshot) -> tuple[tuple[str, str, str], ...]:
    """(counter, src, dst) of the paths the snapshot's tiers move bytes on."""
    return BYTE_PATHS + REMOTE_BYTE_PATHS if snap.get("remote") else BYTE_PATHS


def tier_rows(snap: Snapshot, tokens_per_block: int) -> dict[str, dict[str, int]]:
    """Per tier (cpu, and ssd where it runs): the TIER_GAUGES and TIER_COUNTERS names and their values."""
    c, index = snap["counters"], snap["index"]
    query, cpu_hits = c["get_query_blocks"], c.get("get_cpu_hit_blocks", 0)
    rows: dict[str, dict[str, int]] = {}
    for tier, idx in index.items():
        ssd = tier == "ssd"
        hits = c.get("get_ssd_hit_blocks", 0) if ssd else cpu_hits
        rows[tier] = {
            "capacity_blocks": idx["capacity"], "used_blocks": idx["num_cached"], "locked_blocks": idx["num_locked"],
            "free_blocks": idx["num_free"], "hit_blocks": hits,
            "miss_blocks": query - cpu_hits - hits if ssd else query - cpu_hits,
            "hit_tokens": hits * tokens_per_block,
            "stored_blocks": c["ssd_written_blocks"] if ssd else c["put_stored_blocks"],
            "evicted_blocks": idx["evicted"],
            "verification_failures": c["ssd_mismatch_blocks"] if ssd else 0,
            "read_errors": c["ssd_read_errors"] if ssd else 0, "write_errors": c["ssd_write_errors"] if ssd else 0,
        }
    if snap.get("remote"):
        rows["remote"] = remote_row(snap, tokens_per_block)
    return rows


def render_table(snap: Snapshot, tokens_per_block: int) -> str:
    """``flexkv stats``' tables: the tiers, the latencies (p50 / p99 as bucket bounds) and the queues."""
    rows = tier_rows(snap, tokens_per_block)
    cols = [n for n, _ in TIER_GAUGES[:3]] + [n for n, _ in TIER_COUNTERS]
    heads = ["tier", "capacity", "used", "locked", "hits", "misses", "hit tokens", "stored", "evicted", "verify fail",
             "read err", "write err"]
    table = [heads] + [[tier] + [str(row[c]) for c in cols] for tier, row in rows.items()]
    c = snap["counters"]
    query = c["get_query_blocks"]
    lines = [f"hit rate {100.0 * c['get_hit_blocks'] / query:.1f}% of {query} blocks asked for "
             f"({c['get_requests']} gets, {c['put_requests']} puts, {c['lookup_requests']} lookups; "
             f"{c['tasks_failed']} tasks failed)" if query else
             f"no get yet ({c['put_requests']} puts, {c['lookup_requests']} lookups)"]
    lines += _columns(table)
    lat = [["latency", "count", "p50 <=", "p99 <=", "mean"]]
    for op, h in snap["histograms"].items():
        n = h["count"]
        lat.append([op, str(n), _ms(histogram_quantile(h, 0.5)), _ms(histogram_quantile(h, 0.99)),
                    _ms(h["sum"] / n if n else 0.0)])
    lines += [""] + _columns(lat)
    moved = ", ".join(f"{src}->{dst} {_bytes(c.get(k, 0))}" for k, src, dst in byte_paths(snap))
    queues = ", ".join(f"{k} {v}" for k, v in sorted(queue_depths(snap).items()))
    remote = server_lines(snap) if snap.get("remote") else []
    return "\n".join([*lines, "", f"moved: {moved}", f"queues: {queues}", *remote])


def _columns(table: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in table]


def _ms(seconds: float) -> str:
    return "-" if seconds == 0 else "inf" if seconds == float("inf") else f"{seconds * 1e3:.3g} ms"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def histogram_quantile(h: dict[str, Any], q: float) -> float:
    """The bucket upper bound below which a fraction ``q`` of the observations fall (0.0 when none)."""
    total = h["count"]
    if not total:
        return 0.0
    seen = 0
    for bound, n in zip([*h["bounds"], float("inf")], h["counts"]):
        seen += n
        if seen >= q * total:
            return bound
    return float("inf")


class FlexKVCollector:
    """A prometheus_client collector over ``source()`` (a snapshot); ``labels`` go on every sample (e.g.
    ``{"instance": ...}``); ``extra()`` adds gauges of its own (a server's sessions)."""

    def __init__(self, source: Callable[[], Snapshot], tokens_per_block: int, labels: dict[str, str] | None = None,
                 extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.source, self.tokens_per_block = source, tokens_per_block
        self.labels = dict(labels or {})
        self.extra = extra

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only: registering must not read the plane

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snap = self.source()
        names, values = list(self.labels), list(self.labels.values())
        c = snap["counters"]
        rows = tier_rows(snap, self.tokens_per_block)
        for name, doc in TIER_GAUGES:
            g = GaugeMetricFamily(f"{PREFIX}_tier_{name}", f"FlexKV: {doc}", labels=[*names, "tier"])
            for tier, row in rows.items():
                g.add_metric([*values, tier], row[name])
            yield g
        for name, doc in TIER_COUNTERS:
            m = CounterMetricFamily(f"{PREFIX}_tier_{name}", f"FlexKV: {doc}", labels=[*names, "tier"])
            for tier, row in rows.items():
                m.add_metric([*values, tier], row[name])
            yield m
        m = CounterMetricFamily(f"{PREFIX}_transfer_bytes", "FlexKV: bytes moved, per path and direction",
                                labels=[*names, "src", "dst"])
        for counter, src, dst in byte_paths(snap):
            m.add_metric([*values, src, dst], c.get(counter, 0))
        yield m
        m = CounterMetricFamily(f"{PREFIX}_requests", "FlexKV: requests per operation", labels=[*names, "op"])
        for op in ("get", "put", "lookup"):
            m.add_metric([*values, op], c[f"{op}_requests"])
        yield m
        tpb = self.tokens_per_block
        for name, counter, doc in (("query_tokens", "get_query_blocks", "tokens get requests asked for"),
                                   ("hit_tokens", "get_hit_blocks", "tokens get requests found (any tier)"),
                                   ("loaded_tokens", "get_loaded_blocks", "tokens that reached the engine"),
                                   ("stored_tokens", "put_stored_blocks", "tokens stored into the cache")):
            m = CounterMetricFamily(f"{PREFIX}_{name}", f"FlexKV: {doc}", labels=names)
            m.add_metric(values, c[counter] * tpb)
            yield m
        m = CounterMetricFamily(f"{PREFIX}_put_blocks", "FlexKV: blocks of put requests, by what became of them",
                                labels=[*names, "outcome"])
        for outcome in ("new", "cached", "dropped", "no_prefix"):
            m.add_metric([*values, outcome], c[f"put_{outcome}_blocks"])
        m.add_metric([*values, "ssd_write_skipped"], c["ssd_write_skipped_blocks"])
        if snap.get("remote"):
            m.add_metric([*values, "remote_write_skipped"], c.get("remote_write_skipped_blocks", 0))
        yield m
        m = CounterMetricFamily(f"{PREFIX}_tasks_ended", "FlexKV: tasks that failed or were cancelled",
                                labels=[*names, "outcome"])
        m.add_metric([*values, "failed"], c["tasks_failed"])
        m.add_metric([*values, "cancelled"], c["tasks_cancelled"])
        yield m
        g = GaugeMetricFamily(f"{PREFIX}_queue_depth", "FlexKV: tasks, promotions and write-throughs waiting",
                              labels=[*names, "queue"])
        for queue, depth in sorted(queue_depths(snap).items()):
            g.add_metric([*values, queue], depth)
        yield g
        if snap.get("remote"):
            yield from collect_remote(snap, names, values)
        h = HistogramMetricFamily(f"{PREFIX}_latency_seconds", "FlexKV: latency of matches, loads, stores, "
                                  "promotions and write-throughs", labels=[*names, "op"])
        for op, hist in sorted(snap["histograms"].items()):
            buckets, seen = [], 0
            for bound, n in zip([*hist["bounds"], float("inf")], hist["counts"]):
                seen += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), seen))
            h.add_metric([*values, op], buckets, hist["sum"])
        yield h
        g = GaugeMetricFamily(f"{PREFIX}_tokens_per_block", "FlexKV: tokens in one cache block", labels=names)
        g.add_metric(values, tpb)
        yield g
        for name, value in sorted((self.extra() if self.extra else {}).items()):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", f"FlexKV: {name.replace('_', ' ')}", labels=names)
            g.add_metric(values, value)
            yield g


def metric_names() -> set[str]:
    """Every series name a FlexKVCollector exposes (without a server's extras, and without the remote tier's:
    ``remote_metric_names()``): what a dashboard may query."""
    names = {f"{PREFIX}_tier_{n}" for n, _ in TIER_GAUGES}
    names |= {f"{PREFIX}_tier_{n}_total" for n, _ in TIER_COUNTERS}
    names |= {f"{PREFIX}_{n}_total" for n in ("transfer_bytes", "requests", "query_tokens", "hit_tokens",
                                               "loaded_tokens", "stored_tokens", "put_blocks", "tasks_ended")}
    names |= {f"{PREFIX}_queue_depth", f"{PREFIX}_tokens_per_block"}
    names |= {f"{PREFIX}_latency_seconds_{s}" for s in ("bucket", "sum", "count")}
    return names


def snapshot_from_scrape(text: str) -> tuple[Snapshot, int]:
    """(snapshot, tokens_per_block) rebuilt from a FlexKV endpoint's exposition text: ``flexkv stats
    --metrics URL`` shows an in-process cache's tables with it."""
    from prometheus_client.parser import text_string_to_metric_families

    v: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    labelled: list[tuple[str, dict[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            v[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
            labelled.append((smp.name, dict(smp.labels), smp.value))

    def get(name: str, **labels: str) -> int:
        return int(v.get((f"{PREFIX}_{name}", tuple(sorted(labels.items()))), 0))

    tpb = get("tokens_per_block") or 1
    tiers = sorted({dict(k[1])["tier"] for k in v if k[0] == f"{PREFIX}_tier_capacity_blocks"} - {"remote"})
    index = {t: {"capacity": get("tier_capacity_blocks", tier=t), "num_cached": get("tier_used_blocks", tier=t),
                 "num_locked": get("tier_locked_blocks", tier=t), "num_free": get("tier_free_blocks", tier=t),
                 "evicted": get("tier_evicted_blocks_total", tier=t)} for t in tiers}
    c = {f"{op}_requests": get("requests_total", op=op) for op in ("get", "put", "lookup")}
    c.update(get_query_blocks=get("query_tokens_total") // tpb, get_hit_blocks=get("hit_tokens_total") // tpb,
             get_loaded_blocks=get("loaded_tokens_total") // tpb,
             get_cpu_hit_blocks=get("tier_hit_blocks_total", tier="cpu"),
             get_ssd_hit_blocks=get("tier_hit_blocks_total", tier="ssd"),
             put_stored_blocks=get("tier_stored_blocks_total", tier="cpu"),
             ssd_written_blocks=get("tier_stored_blocks_total", tier="ssd"),
             ssd_mismatch_blocks=get("tier_verification_failures_total", tier="ssd"),
             ssd_read_errors=get("tier_read_errors_total", tier="ssd"),
             ssd_write_errors=get("tier_write_errors_total", tier="ssd"),
             tasks_failed=get("tasks_ended_total", outcome="failed"))
    for key, src, dst in BYTE_PATHS:
        c[key] = get("transfer_bytes_total", src=src, dst=dst)
    gauges = {dict(k[1])["queue"]: int(val) for k, val in v.items() if k[0] == f"{PREFIX}_queue_depth"}
    remote = None
    if (f"{PREFIX}_tier_capacity_blocks", (("tier", "remote"),)) in v:
        rebuilt = remote_from_scrape(get, labelled)
        c.update(rebuilt["counters"])
        remote = rebuilt["remote"]
        gauges.pop("remote_write_queue_blocks", None)
    hists: dict[str, Any] = {}
    for (name, labels), val in v.items():
        if name != f"{PREFIX}_latency_seconds_bucket":
            continue
        lab = dict(labels)
        hists.setdefault(lab["op"], {})[float(lab["le"])] = val
    histograms = {}
    for op, buckets in hists.items():
        bounds = sorted(buckets)
        cumulative = [int(buckets[b]) for b in bounds]
        counts = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
        histograms[op] = {"bounds": bounds[:-1], "counts": counts, "count": cumulative[-1],
                          "sum": v.get((f"{PREFIX}_latency_seconds_sum", (("op", op),)), 0.0)}
    snap = {"counters": c, "index": index, "gauges": gauges, "histograms": histograms}
    if remote is not None:
        snap["remote"] = remote
    return snap, tpb


class MetricsServer:
    """Prometheus metrics over HTTP at ``http://addr:port/metrics``, from a registry of its own."""

    def __init__(self, collector: FlexKVCollector, port: int, addr: str = "0.0.0.0") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_address[1]
        logger.info("FlexKV: Prometheus metrics at http://%s:%d/metrics", addr, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def summary_line(prev: Snapshot | None, snap: Snapshot, tokens_per_block: int) -> str:
    """What happened since ``prev`` (or since start): requests, hit rate per tier, stores, evictions,
    failures; and how full each tier is."""
    c = snap["counters"]
    p = prev["counters"] if prev else {k: 0 for k in c}
    d = {k: c[k] - p.get(k, 0) for k in c}
    rows, prow = tier_rows(snap, tokens_per_block), tier_rows(prev, tokens_per_block) if prev else {}
    local = {t: r for t, r in rows.items() if t != "remote"}  # remote hits are CPU hits of the gets that follow
    query = d["get_query_blocks"]

    def pct(n: int) -> str:
        return f"{100.0 * n / query:.1f}%" if query else "-"

    hits = ", ".join(f"{t} {pct(r['hit_blocks'] - prow.get(t, {}).get('hit_blocks', 0))}" for t, r in local.items())
    evicted = ", ".join(f"{t} {r['evicted_blocks'] - prow.get(t, {}).get('evicted_blocks', 0)}"
                        for t, r in rows.items())
    used = ", ".join(f"{t} {r['used_blocks']}/{r['capacity_blocks']}" for t, r in rows.items())
    load = snap["histograms"].get("load")
    p50 = f", load p50 <= {histogram_quantile(load, 0.5) * 1e3:g} ms" if load and load["count"] else ""
    return (f"FlexKV: {d['get_requests']} gets, {d['put_requests']} puts: hit rate {pct(d['get_hit_blocks'])} "
            f"({hits}), {d['get_hit_blocks'] * tokens_per_block} hit tokens{p50}; stored {d['put_stored_blocks']} "
            f"blocks (ssd {d['ssd_written_blocks']}), evicted {evicted}; failures: tasks {d['tasks_failed']}, "
            f"ssd verification {d['ssd_mismatch_blocks']}, ssd I/O {d['ssd_read_errors'] + d['ssd_write_errors']}, "
            f"skipped stores {d['put_dropped_blocks'] + d['ssd_write_skipped_blocks']} blocks; used {used}"
            f"{summary_part(prev, snap) if snap.get('remote') else ''}")


class StatsLogger:
    """Logs ``summary_line`` every ``every_requests`` get/put requests (0: never) and, with ``every_s`` > 0,
    at most that often while requests come. Polls the counters ``poll_s`` apart on a thread of its own."""

    def __init__(self, source: Callable[[], Snapshot], tokens_per_block: int, every_requests: int,
                 every_s: float = 0.0, poll_s: float = 0.5) -> None:
        self.source, self.tpb = source, tokens_per_block
        self.every_requests, self.every_s, self.poll_s = every_requests, every_s, poll_s
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexkv-stats-log", daemon=True)

    @property
    def enabled(self) -> bool:
        return self.every_requests > 0 or self.every_s > 0

    def start(self) -> StatsLogger:
        if self.enabled:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last: Snapshot | None = None
        last_t = time.monotonic()
        while not self._stop.wait(self.poll_s):
            try:
                snap = self.source()
            except Exception:  # the plane closed under us: nothing more to log
                return
            c = snap["counters"]
            done = c["get_requests"] + c["put_requests"]
            before = last["counters"]["get_requests"] + last["counters"]["put_requests"] if last else 0
            due = self.every_requests > 0 and done - before >= self.every_requests
            due = due or (self.every_s > 0 and done > before and time.monotonic() - last_t >= self.every_s)
            if due:
                logger.info("%s", summary_line(last, snap, self.tpb))
                self.lines += 1
                last, last_t = snap, time.monotonic()


class PlaneObservers:
    """What one control plane shows its operator: the Prometheus endpoint (``metrics_port`` > 0) and the
    periodic log line. Both read ``source()``; ``close()`` stops them."""

    def __init__(self, source: Callable[[], Snapshot], tokens_per_block: int, *, metrics_port: int = 0,
                 every_requests: int = 0, every_s: float = 0.0, labels: dict[str, str] | None = None,
                 extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.metrics: MetricsServer | None = None
        if metrics_port:
            self.metrics = MetricsServer(FlexKVCollector(source, tokens_per_block, labels, extra), metrics_port)
        self.log = StatsLogger(source, tokens_per_block, every_requests, every_s).start()

    def close(self) -> None:
        self.log.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
