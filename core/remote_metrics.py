"""The remote tier in FlexKV's metrics: its row in the per-tier tables, its circuit breakers, and the
Prometheus series of both (core/metrics.py calls these when a snapshot has a ``remote`` section).

A snapshot's ``remote`` section is ``RemoteTier.describe()``: capacity, blocks in the index as last seen,
the write-through queue, whether the index is being rebuilt, and per server (``s3``, ``redis``) its breaker's
state (``closed``, ``half_open``, ``open``), trips, failed and refused requests. The remote tier's counts
(hits, misses, objects and bytes fetched and written, errors, skipped stores, evictions) are the control
plane's ``remote_*`` counters; its latencies are the ``remote_promotion`` and ``remote_write_through``
histograms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Snapshot = dict[str, Any]
PREFIX = "flexkv"

# (counter, src, dst) of the bytes the remote tier moved (object bytes, headers included).
REMOTE_BYTE_PATHS = (("remote_read_bytes", "remote", "cpu"), ("remote_write_bytes", "cpu", "remote"))
STATES = ("closed", "half_open", "open")  # a breaker state's index is its gauge value
# (series, breaker field, help) of the per-server counters.
SERVER_COUNTERS = (("remote_breaker_trips", "trips", "times the server's circuit breaker opened"),
                   ("remote_request_failures", "failures", "requests to the server that failed"),
                   ("remote_refused_requests", "refused", "requests not sent: the server's breaker was open"))


def remote_section(plane: Any) -> dict[str, Any] | None:
    """``RemoteTier.describe()`` of an in-process plane's remote tier; None without one (or for the client of
    a server, whose ``stats()`` carries the server's section)."""
    from .control_plane import remote_tier_of

    tier = remote_tier_of(plane)
    return tier.describe() if tier is not None else None


def remote_row(snap: Snapshot, tokens_per_block: int) -> dict[str, int]:
    """The remote tier's row of ``tier_rows``: hits are blocks promoted from it (they are then CPU hits of
    the get that follows), misses are blocks its index was asked for and did not hold (or could not
    answer), stored are blocks written through to it."""
    c, r = snap["counters"], snap["remote"]
    used = int(r.get("index_blocks") or 0)
    hits = c.get("remote_hit_blocks", 0)
    return {"capacity_blocks": int(r["capacity"]), "used_blocks": used, "locked_blocks": 0,
            "free_blocks": max(0, int(r["capacity"]) - used), "hit_blocks": hits,
            "miss_blocks": c.get("remote_miss_blocks", 0), "hit_tokens": hits * tokens_per_block,
            "stored_blocks": c.get("remote_written_blocks", 0), "evicted_blocks": c.get("remote_evicted_blocks", 0),
            "verification_failures": c.get("remote_mismatch_blocks", 0), "read_errors": c.get("remote_read_errors", 0),
            "write_errors": c.get("remote_write_errors", 0)}


def collect_remote(snap: Snapshot, names: list[str], values: list[str]) -> Iterator[Any]:
    """The remote-only series (the tier's row, byte paths and latencies go with the other tiers')."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    c, r = snap["counters"], snap["remote"]
    servers = r.get("servers", [])
    g = GaugeMetricFamily(f"{PREFIX}_remote_breaker_state", "FlexKV: the remote server's circuit breaker: "
                          "0 closed, 1 half-open (probing), 2 open (refusing requests)",
                          labels=[*names, "server", "endpoint"])
    for s in servers:
        g.add_metric([*values, s["server"], s["endpoint"]], STATES.index(s["state"]))
    yield g
    for series, field, doc in SERVER_COUNTERS:
        m = CounterMetricFamily(f"{PREFIX}_{series}", f"FlexKV: {doc}", labels=[*names, "server", "endpoint"])
        for s in servers:
            m.add_metric([*values, s["server"], s["endpoint"]], s[field])
        yield m
    for series, counter, doc in (("remote_index_errors", "remote_index_errors", "index (Redis) requests that failed"),
                                 ("remote_fetched_blocks", "remote_read_blocks",
                                  "objects downloaded from the remote tier (before verification)")):
        m = CounterMetricFamily(f"{PREFIX}_{series}", f"FlexKV: {doc}", labels=names)
        m.add_metric(values, c.get(counter, 0))
        yield m
    g = GaugeMetricFamily(f"{PREFIX}_remote_index_rebuilding", "FlexKV: 1 while the remote index is rebuilt from "
                          "the bucket", labels=names)
    g.add_metric(values, int(bool(r.get("rebuilding"))))
    yield g


def remote_metric_names() -> set[str]:
    """The series only an endpoint of a plane with a remote tier serves (its tier row's series included)."""
    names = {f"{PREFIX}_remote_breaker_state", f"{PREFIX}_remote_index_rebuilding"}
    names |= {f"{PREFIX}_{series}_total" for series, _, _ in SERVER_COUNTERS}
    names |= {f"{PREFIX}_remote_index_errors_total", f"{PREFIX}_remote_fetched_blocks_total"}
    return names


def server_lines(snap: Snapshot) -> list[str]:
    """``flexkv stats``' lines of the remote servers and the tier's queue."""
    r = snap["remote"]
    c = snap["counters"]
    lines = [f"remote servers ({'rebuilding the index, ' if r.get('rebuilding') else ''}"
             f"{r.get('write_queue_blocks', 0)} blocks queued for write-through, "
             f"{c.get('remote_write_skipped_blocks', 0)} skipped, {c.get('remote_index_errors', 0)} index errors):"]
    for s in r.get("servers", []):
        lines.append(f"  {s['server']} {s['endpoint']}: {s['state']} (trips {s['trips']}, failed requests "
                     f"{s['failures']}, refused {s['refused']})")
    return lines


def summary_part(prev: Snapshot | None, snap: Snapshot) -> str:
    """The periodic line's remote part: what happened since ``prev``, and the breakers now."""
    c = snap["counters"]
    p = prev["counters"] if prev else {}

    def d(k: str) -> int:
        return c.get(k, 0) - p.get(k, 0)

    states = ", ".join(f"{s['server']} {s['state']}" for s in snap["remote"].get("servers", []))
    return (f"; remote: {d('remote_hit_blocks')} hits, {d('remote_miss_blocks')} misses, stored "
            f"{d('remote_written_blocks')}, skipped {d('remote_write_skipped_blocks')}, errors "
            f"{d('remote_read_errors') + d('remote_write_errors') + d('remote_index_errors')} ({states})")


def remote_from_scrape(get: Callable[..., int], labelled: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """(counters, remote section) rebuilt from a scrape: ``get(series, **labels)`` reads one sample,
    ``labelled`` is every (series, labels, value)."""
    counters = {
        "remote_hit_blocks": get("tier_hit_blocks_total", tier="remote"),
        "remote_miss_blocks": get("tier_miss_blocks_total", tier="remote"),
        "remote_written_blocks": get("tier_stored_blocks_total", tier="remote"),
        "remote_evicted_blocks": get("tier_evicted_blocks_total", tier="remote"),
        "remote_mismatch_blocks": get("tier_verification_failures_total", tier="remote"),
        "remote_read_errors": get("tier_read_errors_total", tier="remote"),
        "remote_write_errors": get("tier_write_errors_total", tier="remote"),
        "remote_write_skipped_blocks": get("put_blocks_total", outcome="remote_write_skipped"),
        "remote_index_errors": get("remote_index_errors_total"),
        "remote_read_blocks": get("remote_fetched_blocks_total"),
    }
    for key, src, dst in REMOTE_BYTE_PATHS:
        counters[key] = get("transfer_bytes_total", src=src, dst=dst)
    servers: dict[tuple[str, str], dict[str, Any]] = {}
    for name, labels, value in labelled:
        if "server" not in labels:
            continue
        s = servers.setdefault((labels["server"], labels["endpoint"]), {
            "server": labels["server"], "endpoint": labels["endpoint"], "state": "closed", "trips": 0, "failures": 0,
            "refused": 0})
        if name == f"{PREFIX}_remote_breaker_state":
            s["state"] = STATES[min(len(STATES) - 1, max(0, int(value)))]
        for series, field, _ in SERVER_COUNTERS:
            if name == f"{PREFIX}_{series}_total":
                s[field] = int(value)
    used = get("tier_used_blocks", tier="remote")
    section = {"capacity": get("tier_capacity_blocks", tier="remote"), "index_blocks": used,
               "write_queue_blocks": get("queue_depth", queue="remote_write_queue_blocks"),
               "rebuilding": bool(get("remote_index_rebuilding")), "read_only": False,
               "servers": list(servers.values())}
    return {"counters": counters, "remote": section}


__all__ = ["REMOTE_BYTE_PATHS", "collect_remote", "remote_from_scrape", "remote_metric_names", "remote_row",
           "remote_section", "server_lines", "summary_part"]
