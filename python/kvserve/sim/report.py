"""The simulation's printed table, JSON file and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvserve.sim.simulator import SimResult


def format_table(rows: list[dict[str, Any]], labels: list[str]) -> str:
    head = (f"{'run':>16} {'done':>7} {'refused':>7} {'req/s':>7} {'out tok/s':>10} "
            f"{'TTFT p50/p90/p99 ms':>24} {'ITL p50/p90/p99 ms':>21} {'E2E p50/p99 s':>14} "
            f"{'prefix hit':>10} {'preempt':>7} {'KV mean/max':>11}")
    out = [head, "-" * len(head)]
    for label, s in zip(labels, rows):
        t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        out.append(
            f"{label:>16} {s['completed']:>7} {s['refused_total']:>7} "
            f"{s['request_throughput']:>7.2f} {s['output_token_throughput']:>10.1f} "
            + f"{t['p50']:.1f}/{t['p90']:.1f}/{t['p99']:.1f}".rjust(25)
            + f"{i['p50']:.1f}/{i['p90']:.1f}/{i['p99']:.1f}".rjust(22)
            + f"{e['p50'] / 1e3:.2f}/{e['p99'] / 1e3:.2f}".rjust(15)
            + f" {s['prefix_hit_rate']:>10.1%} {s['preemptions']:>7} "
            + f"{s['kv_usage_mean']:.0%}/{s['kv_usage_max']:.0%}".rjust(11))
    return "\n".join(out)


def write_json(path: Path, result: SimResult, meta: dict[str, Any]) -> None:
    doc = {"meta": meta, "summary": result.summary(),
           "series": {"t_s": result.series.times, **result.series.values},
           "replicas": result.core_metrics}
    path.write_text(json.dumps(doc, indent=1))


def write_plots(out_dir: Path, result: SimResult, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ts = np.asarray(result.series.times)
    v = result.series.values
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.plot(ts, np.asarray(v["kv_usage_mean"]) * 100, label="mean over replicas")
    ax1.plot(ts, np.asarray(v["kv_usage_max"]) * 100, label="busiest replica", alpha=0.7)
    ax1.set_ylabel("KV blocks used (%)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(ts, v["running"], label="running (batch)")
    ax2.plot(ts, v["waiting"], label="waiting")
    ax2.set_xlabel("simulated time (s)")
    ax2.set_ylabel("requests, whole fleet")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"kvserve sim: load over time ({title})")
    fig.tight_layout()
    path = out_dir / "load_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    s = result.stats
    for ax, (name, hist) in zip(axes, (("time to first token", s.ttft),
                                       ("inter-token latency", s.itl),
                                       ("end-to-end latency", s.e2e))):
        if hist.total:  # (reading total bins the buffered values)
            edges = np.exp(hist._log_lo + (np.arange(hist.nbins) - 0.5) / hist._inv)
            cdf = np.cumsum(hist.counts) / hist.total
            keep = hist.counts > 0
            ax.plot(edges[keep] * 1e3, cdf[keep])
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction")
        ax.grid(alpha=0.3)
    fig.suptitle(f"kvserve sim: latency CDFs ({title})")
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
