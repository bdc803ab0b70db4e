"""``flexkv bench --plot``'s figures: hit rate per configuration, load latency distribution per configuration,
and hit rate against capacity (one line per block size) when ``--capacities`` sweeps it.

``figures(results)`` builds them (tests read their axes); ``save(results, path)`` writes ``path`` and its
siblings ``<stem>-latency.png`` and ``<stem>-capacity.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import FlexKVError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise FlexKVError("--plot needs matplotlib: pip install 'flexkv[plot]' (or pip install matplotlib)") from e
    return plt


def figures(results: list[Any]) -> dict[str, Any]:
    """name -> matplotlib Figure: "hit_rate", "latency", and "capacity" when results hold a sweep."""
    plt = _pyplot()
    out: dict[str, Any] = {}
    named = [r for r in results if not r.sweep]
    shown = named or results
    names = [r.name for r in shown]
    height = 1.2 + 0.45 * len(shown)

    fig, ax = plt.subplots(figsize=(7, height))
    cpu = [100 * (r.hit_tokens - r.ssd_hit_tokens) / r.prompt_tokens if r.prompt_tokens else 0.0 for r in shown]
    ssd = [100 * r.ssd_hit_tokens / r.prompt_tokens if r.prompt_tokens else 0.0 for r in shown]
    ax.barh(names, cpu, color="#4C72B0", label="from the CPU tier")
    if any(ssd):
        ax.barh(names, ssd, left=cpu, color="#DD8452", label="from the SSD tier")
    for i, (a, b) in enumerate(zip(cpu, ssd)):
        ax.text(a + b + 1, i, f"{a + b:.1f}%", va="center", fontsize=9)
    ax.set_xlim(0, 110)
    ax.set_xlabel("hit rate (% of prompt tokens)")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(shown) < 4 else -0.15), ncol=2, fontsize=8,
              frameon=False)
    ax.set_title("FlexKV bench: hit rate per configuration")
    fig.tight_layout()
    out["hit_rate"] = fig

    fig, ax = plt.subplots(figsize=(7, height))
    stats = []
    for r in shown:
        p = r.load_ms
        stats.append({"label": r.name, "whislo": p["p5"], "q1": p["p25"], "med": p["p50"], "q3": p["p75"],
                      "whishi": p["p99"], "fliers": []})
    import matplotlib

    newer = tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (3, 10)
    ax.bxp(stats, showfliers=False, **({"orientation": "horizontal"} if newer else {"vert": False}))
    ax.set_xscale("log")
    ax.set_xlabel("load latency per request (ms; box p25-p75, line p50, whiskers p5-p99)")
    ax.invert_yaxis()
    ax.set_title("FlexKV bench: load latency per configuration")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    out["latency"] = fig

    sweep = [r for r in results if r.sweep]
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
        for i, tpb in enumerate(sorted({r.tokens_per_block for r in sweep})):
            pts = sorted((r.capacity_bytes / 2**30, 100 * r.hit_rate) for r in sweep if r.tokens_per_block == tpb)
            marker, style = styles[i % len(styles)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=style, markerfacecolor="none",
                    label=f"block {tpb} tokens")
        ax.set_xscale("log")
        ax.set_xlabel("CPU tier capacity (GiB)")
        ax.set_ylabel("hit rate (% of prompt tokens)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title("FlexKV bench: hit rate against capacity")
        fig.tight_layout()
        out["capacity"] = fig
    return out


def paths(path: str) -> dict[str, str]:
    p = Path(path)
    stem = p.with_suffix("")
    return {"hit_rate": str(p), "latency": f"{stem}-latency.png", "capacity": f"{stem}-capacity.png"}


def save(results: list[Any], path: str) -> list[str]:
    """Writes the figures; returns their paths."""
    plt = _pyplot()
    written = []
    where = paths(path)
    for name, fig in figures(results).items():
        fig.savefig(where[name], dpi=120, bbox_inches="tight")  # the legend below the axes included
        plt.close(fig)
        written.append(where[name])
    return written
