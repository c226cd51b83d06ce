"""Summaries, the printed table, the JSON file and the PNG plots of a load run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvserve.bench.driver import LoadRun

PERCENTILES = (50, 90, 99)


@dataclass
class Summary:
    rate: float
    concurrency: int
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_token_throughput: float  # generated tokens / s
    total_token_throughput: float  # (prompt + generated) tokens / s
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    prefix_hit_rate: float  # cached prompt tokens / prompt tokens
    preemptions: int
    recomputed_tokens: int
    errors: dict[str, int]
    # The host tier (0 when it is off): prompt tokens found only on the host, bytes loaded.
    prefix_hits_host_tokens: int = 0
    host_loaded_bytes: int = 0


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in PERCENTILES}
    arr = np.asarray(values) * 1e3
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}


def _delta(run: LoadRun, *keys: str) -> int:
    return int(sum(run.load_after.get(k, 0) - run.load_before.get(k, 0) for k in keys))


def summarise(run: LoadRun) -> Summary:
    done = [r for r in run.records if r.ok]
    errors: dict[str, int] = {}
    for r in run.records:
        if r.error is not None:
            kind = r.error.split(":", 1)[0]
            errors[kind] = errors.get(kind, 0) + 1
    out_tokens = sum(len(r.output_token_ids) for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_prompt_tokens for r in done)
    duration = max(run.duration_s, 1e-9)
    return Summary(
        rate=run.rate,
        concurrency=run.concurrency,
        requests=len(run.records),
        completed=len(done),
        failed=len(run.records) - len(done),
        duration_s=run.duration_s,
        request_throughput=len(done) / duration,
        output_token_throughput=out_tokens / duration,
        total_token_throughput=(out_tokens + prompt_tokens) / duration,
        ttft_ms=_percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        itl_ms=_percentiles([g for r in done for g in r.token_gaps_s]),
        e2e_ms=_percentiles([r.e2e_s for r in done if r.e2e_s is not None]),
        prefix_hit_rate=cached / prompt_tokens if prompt_tokens else 0.0,
        preemptions=_delta(run, "preemptions_recompute", "preemptions_swap"),
        recomputed_tokens=_delta(run, "recomputed_tokens"),
        errors=errors,
        prefix_hits_host_tokens=_delta(run, "prefix_hits_host_tokens"),
        host_loaded_bytes=_delta(run, "host_loaded_bytes"),
    )


def format_table(summaries: list[Summary]) -> str:
    head = (
        f"{'rate':>6} {'conc':>4} {'done':>6} {'fail':>4} {'req/s':>7} {'out tok/s':>10} "
        f"{'TTFT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>20} {'E2E p50/p99 s':>14} "
        f"{'prefix hit':>10} {'preempt':>7}"
    )
    rows = [head, "-" * len(head)]
    for s in summaries:
        rate = "inf" if s.rate <= 0 else f"{s.rate:g}"
        t, i, e = s.ttft_ms, s.itl_ms, s.e2e_ms
        rows.append(
            f"{rate:>6} {s.concurrency:>4} {s.completed:>6} {s.failed:>4} "
            f"{s.request_throughput:>7.2f} {s.output_token_throughput:>10.1f} "
            f"{t['p50']:>7.1f}/{t['p90']:.1f}/{t['p99']:.1f}".rjust(23)
            + f"{i['p50']:>6.1f}/{i['p90']:.1f}/{i['p99']:.1f}".rjust(21)
            + f"{e['p50'] / 1e3:>6.2f}/{e['p99'] / 1e3:.2f}".rjust(15)
            + f" {s.prefix_hit_rate:>10.1%} {s.preemptions:>7}"
        )
    return "\n".join(rows)


def write_json(path: Path, summaries: list[Summary], runs: list[LoadRun], meta: dict) -> None:
    per_request = [
        [
            {
                "request_id": r.request_id,
                "turn": r.turn,
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": len(r.output_token_ids),
                "cached_prompt_tokens": r.cached_prompt_tokens,
                "ttft_s": r.ttft_s,
                "e2e_s": r.e2e_s,
                "finish_reason": r.finish_reason,
                "error": r.error,
            }
            for r in run.records
        ]
        for run in runs
    ]
    doc = {"meta": meta, "summaries": [asdict(s) for s in summaries], "requests": per_request}
    path.write_text(json.dumps(doc, indent=2))


def write_plots(out_dir: Path, summaries: list[Summary], runs: list[LoadRun]) -> list[Path]:
    """Latency CDFs per run, and throughput / TTFT against request rate for a sweep."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run, s in zip(runs, summaries):
        label = f"rate {'inf' if s.rate <= 0 else f'{s.rate:g}'}/s"
        done = [r for r in run.records if r.ok]
        series = (
            ("time to first token (ms)", [r.ttft_s * 1e3 for r in done if r.ttft_s is not None]),
            ("inter-token latency (ms)", [g * 1e3 for r in done for g in r.token_gaps_s]),
            ("end-to-end latency (s)", [r.e2e_s for r in done if r.e2e_s is not None]),
        )
        for ax, (title, values) in zip(axes, series):
            if values:
                xs = np.sort(np.asarray(values))
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
            ax.set_xlabel(title)
            ax.set_ylabel(
                "fraction of tokens" if "inter-token" in title else "fraction of requests"
            )
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("kvserve bench: latency CDFs")
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if len(summaries) > 1:
        rates = [s.rate for s in summaries]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ax1.plot(rates, [s.output_token_throughput for s in summaries], "o-", label="output")
        ax1.plot(rates, [s.total_token_throughput for s in summaries], "s-", label="total")
        ax1.set_xlabel("request rate (req/s)")
        ax1.set_ylabel("tokens / s")
        ax1.legend()
        ax1.grid(alpha=0.3)
        for p in PERCENTILES:
            ax2.plot(rates, [s.ttft_ms[f"p{p}"] for s in summaries], "o-", label=f"p{p}")
        ax2.set_xlabel("request rate (req/s)")
        ax2.set_ylabel("time to first token (ms)")
        ax2.legend()
        ax2.grid(alpha=0.3)
        fig.suptitle("kvserve bench: throughput and TTFT against request rate")
        fig.tight_layout()
        path = out_dir / "rate_sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
