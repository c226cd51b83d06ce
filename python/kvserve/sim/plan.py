"""`kvserve plan`: the smallest fleet whose simulated latency meets an SLO at a rate.

For each per-replica setting (max_num_seqs x token budget) the replica count is searched by
doubling then bisection (more replicas never make a fleet slower under these routers), and
every simulated point is kept for the printed table.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
SLO_KEYS = tuple(f"{m}_p{p}" for m in ("ttft", "itl", "e2e") for p in (50, 90, 99))


@dataclass(frozen=True)
class Slo:
    limits: dict[str, float]  # "ttft_p99" -> seconds

    @classmethod
    def parse(cls, text: str) -> Slo:
        limits: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"slo: {key!r} is not one of {', '.join(SLO_KEYS)} "
                                 "(write e.g. ttft_p99=2s,itl_p99=80ms)")
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(us|ms|s)\s*", value)
            if m is None:
                raise ValueError(f"slo: {key}: cannot parse {value!r} (a time such as 2s, "
                                 "80ms, 500us)")
            limits[key] = float(m.group(1)) * _UNITS[m.group(2)]
        if not limits:
            raise ValueError("slo: give at least one limit, e.g. ttft_p99=2s")
        return cls(limits)

    def violations(self, summary: dict[str, Any]) -> list[str]:
        """Why a simulated run misses the SLO (empty when it meets it)."""
        why = []
        for key, limit in self.limits.items():
            metric, p = key.rsplit("_", 1)
            got = summary[f"{metric}_ms"][p] / 1e3
            if not got <= limit:  # NaN (nothing finished) misses too
                why.append(f"{key} {got * 1e3:.0f}ms > {limit * 1e3:g}ms")
        if summary["refused_total"]:
            why.append(f"{summary['refused_total']} refused")
        return why

    def __str__(self) -> str:
        return ",".join(f"{k}={v * 1e3:g}ms" for k, v in self.limits.items())


@dataclass(frozen=True)
class Candidate:
    replicas: int
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclass
class Row:
    candidate: Candidate
    rate: float
    summary: dict[str, Any]
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class PlanResult:
    rows: list[Row] = field(default_factory=list)
    best: Candidate | None = None
    refusing_rate: float | None = None  # lowest searched rate at which `best` refuses
    refusing_searched_to: float = 0.0


RunFn = Callable[[Candidate, float], dict[str, Any]]


class PlanError(ValueError):
    """No fleet in the search space meets the SLO; carries the table of what was tried."""

    def __init__(self, message: str, result: PlanResult) -> None:
        super().__init__(message)
        self.result = result


def check_memory(max_replicas: int, blocks_per_replica: int, max_num_seqs: int,
                 max_model_len: int, block_size: int) -> None:
    """Refuse a search whose largest fleet would not fit in this machine's memory."""
    per_replica = blocks_per_replica * 128 + 8 * max_num_seqs * (max_model_len // block_size)
    try:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return
    if max_replicas * per_replica > avail // 2:
        raise ValueError(f"max_replicas: {max_replicas} replicas of {blocks_per_replica} KV "
                         f"blocks need ~{max_replicas * per_replica / 2**30:.1f} GiB, over half "
                         f"of the {avail / 2**30:.1f} GiB free here; search fewer")


def search(run: RunFn, rate: float, slo: Slo, seqs_options: tuple[int, ...],
           budget_options: tuple[int, ...], max_replicas: int) -> PlanResult:
    if max_replicas < 1:
        raise ValueError(f"max_replicas: must be >= 1, got {max_replicas}")
    result = PlanResult()
    cache: dict[Candidate, Row] = {}

    def ok(c: Candidate) -> bool:
        if c not in cache:
            summary = run(c, rate)
            cache[c] = Row(c, rate, summary, slo.violations(summary))
            result.rows.append(cache[c])
        return cache[c].ok

    best: Candidate | None = None
    for seqs in seqs_options:
        for budget in budget_options:
            make = functools.partial(Candidate, max_num_seqs=seqs,
                                     max_num_batched_tokens=budget)
            hi = 1
            while hi < max_replicas and not ok(make(hi)):
                hi = min(hi * 2, max_replicas)
            if not ok(make(hi)):
                continue
            lo = hi // 2  # fails (or 0)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ok(make(mid)):
                    hi = mid
                else:
                    lo = mid
            c = make(hi)
            if best is None or c.replicas < best.replicas:
                best = c
    result.best = best
    if best is None:
        raise PlanError(f"slo: no fleet of up to {max_replicas} replicas meets {slo} at "
                        f"{rate:g} req/s", result)
    return result


def find_refusing_rate(run: RunFn, result: PlanResult, rate: float, max_factor: float = 16.0,
                       bisections: int = 3) -> None:
    """The lowest rate (of those tried) at which the chosen fleet refuses requests."""
    best = result.best
    assert best is not None

    def refuses(r: float) -> bool:
        summary = run(best, r)
        result.rows.append(Row(best, r, summary, ["refusing"] if summary["refused_total"]
                               else []))
        return summary["refused_total"] > 0

    lo, hi = rate, rate * 2
    while hi <= rate * max_factor and not refuses(hi):
        lo, hi = hi, hi * 2
    result.refusing_searched_to = min(hi, rate * max_factor)
    if hi > rate * max_factor:
        return
    for _ in range(bisections):
        mid = (lo + hi) / 2
        if refuses(mid):
            hi = mid
        else:
            lo = mid
    result.refusing_rate = hi


def format_rows(result: PlanResult) -> str:
    head = (f"{'replicas':>8} {'seqs':>5} {'budget':>6} {'rate':>7} {'TTFT p50/p99 ms':>17} "
            f"{'ITL p50/p99 ms':>15} {'refused':>7} {'KV max':>6}  verdict")
    out = [head, "-" * len(head)]
    for r in result.rows:
        c, s = r.candidate, r.summary
        t, i = s["ttft_ms"], s["itl_ms"]
        out.append(f"{c.replicas:>8} {c.max_num_seqs:>5} {c.max_num_batched_tokens:>6} "
                   f"{r.rate:>7.3g} " + f"{t['p50']:.0f}/{t['p99']:.0f}".rjust(17)
                   + f"{i['p50']:.1f}/{i['p99']:.1f}".rjust(16)
                   + f" {s['refused_total']:>7} {s['kv_usage_max']:>6.0%}  "
                   + ("meets SLO" if r.ok else "; ".join(r.violations)))
    return "\n".join(out)
