"""Where simulated requests come from: the `kvserve bench` workloads, the Azure LLM
inference trace (CSV: TIMESTAMP, ContextTokens, GeneratedTokens) and kvserve's own JSONL
trace with conversation and shared-prefix ids.

Every source streams: it holds the requests not yet arrived one at a time (plus, for
conversations, each live conversation's history), never the whole trace.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np

from kvserve.bench.workloads import RequestSpec, Workload, poisson_arrivals

SYNTHETIC_TOKEN = 5  # every simulated output token; prefix hashes still chain per request


class TraceError(ValueError):
    """A trace file that does not parse; the message names the file, line and field."""


class RequestSource(Protocol):
    def arrivals(self) -> Iterator[tuple[float, RequestSpec]]: ...

    def follow_up(self, spec: RequestSpec, output_tokens: int
                  ) -> tuple[float, RequestSpec] | None: ...


class WorkloadSource:
    """A `kvserve bench` workload at a Poisson rate of conversations, seeded as bench seeds
    it: with num_requests, the same arrivals and prompts as `kvserve bench` draws."""

    def __init__(self, workload: Workload, rate: float, num_requests: int | None = None,
                 duration_s: float | None = None, seed: int = 0) -> None:
        if (num_requests is None) == (duration_s is None):
            raise ValueError("give exactly one of num_requests and duration")
        if rate <= 0 and duration_s is not None:
            raise ValueError("rate: must be > 0 with a duration")
        self.workload, self.rate, self.seed = workload, rate, seed
        self.num_requests, self.duration_s = num_requests, duration_s
        self.budget = num_requests if num_requests is not None else math.inf

    def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
        w = self.workload
        if self.num_requests is not None:
            turns = w.turns if w.name == "multiturn" else 1
            n = math.ceil(self.num_requests / turns)
            times = poisson_arrivals(n, self.rate, self.seed)
            firsts = [w.new_request(i) for i in range(n)]  # drawn up front, as bench does
            yield from zip(times.tolist(), firsts)
            return
        rng = np.random.default_rng(self.seed + 1)
        t, i = 0.0, 0
        assert self.duration_s is not None
        while True:
            for gap in rng.exponential(1.0 / self.rate, size=4096).tolist():
                if t > self.duration_s:
                    return
                yield t, w.new_request(i)
                t, i = t + gap, i + 1

    def follow_up(self, spec: RequestSpec, output_tokens: int
                  ) -> tuple[float, RequestSpec] | None:
        nxt = self.workload.follow_up(spec, [SYNTHETIC_TOKEN] * output_tokens)
        if nxt is None:
            return None
        return self.workload.think_time(), nxt


def _prefix_tokens(key: str, n: int, low: int, vocab: int) -> list[int]:
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(low, vocab, size=n).tolist()


class _TraceBase:
    def __init__(self, path: str | Path, vocab_size: int, seed: int, time_scale: float) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TraceError(f"trace: {self.path} does not exist")
        if time_scale <= 0:
            raise ValueError(f"time_scale: must be > 0, got {time_scale}")
        self.vocab, self.time_scale = vocab_size, time_scale
        self.low = min(128, vocab_size // 4)
        self.rng = np.random.default_rng(seed)
        self.budget = math.inf

    def _fresh(self, n: int) -> list[int]:
        return self.rng.integers(self.low, self.vocab, size=n).tolist()

    def _err(self, line: int, text: str) -> TraceError:
        return TraceError(f"{self.path}:{line}: {text}")

    def follow_up(self, spec: RequestSpec, output_tokens: int
                  ) -> tuple[float, RequestSpec] | None:
        return None  # a trace states every turn's arrival itself


def _positive_int(value: object) -> int | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return int(f) if f >= 1 and f == int(f) else None


class AzureTraceSource(_TraceBase):
    """Azure LLM inference trace rows; TIMESTAMP is a date-time or seconds. Each row's
    prompt is fresh random tokens (the trace carries no prefix structure)."""

    COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

    def __init__(self, path: str | Path, vocab_size: int, seed: int = 0,
                 time_scale: float = 1.0) -> None:
        super().__init__(path, vocab_size, seed, time_scale)

    @staticmethod
    def _seconds(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            pass
        text = text.strip().replace("T", " ")
        if "." in text:  # the trace writes 7 fractional digits; datetime takes 6
            head, frac = text.split(".", 1)
            digits = "".join(c for c in frac if c.isdigit())
            text = f"{head}.{digits[:6].ljust(6, '0')}{frac[len(digits):]}"
        return datetime.fromisoformat(text).timestamp()

    def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise self._err(1, "empty file (expected a header "
                                   f"{','.join(self.COLUMNS)})")
            header = [h.strip() for h in header]
            missing = [c for c in self.COLUMNS if c not in header]
            if missing:
                raise self._err(1, f"missing column {missing[0]} (header: {','.join(header)})")
            cols = [header.index(c) for c in self.COLUMNS]
            t0 = last = None
            for n, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) <= max(cols):
                    raise self._err(n, f"expected {len(header)} columns, got {len(row)}")
                try:
                    ts = self._seconds(row[cols[0]])
                except ValueError:
                    raise self._err(n, f"TIMESTAMP: cannot parse {row[cols[0]]!r}") from None
                prompt, out = _positive_int(row[cols[1]]), _positive_int(row[cols[2]])
                if prompt is None:
                    raise self._err(n, f"ContextTokens: expected an integer >= 1, "
                                       f"got {row[cols[1]]!r}")
                if out is None:
                    raise self._err(n, f"GeneratedTokens: expected an integer >= 1, "
                                       f"got {row[cols[2]]!r}")
                t0 = ts if t0 is None else t0
                if last is not None and ts < last:
                    raise self._err(n, "TIMESTAMP: goes back in time (rows must be sorted)")
                last = ts
                yield ((ts - t0) * self.time_scale,
                       RequestSpec(f"azure-{n}", self._fresh(prompt), out, conversation=n))


class JsonlTraceSource(_TraceBase):
    """One JSON object a line:

        {"timestamp": 0.25, "prompt_tokens": 900, "output_tokens": 120,
         "conversation": "c17", "shared_prefix": "sys-a", "shared_prefix_tokens": 512}

    timestamp (seconds, non-decreasing), prompt_tokens and output_tokens are required. A
    request with a `conversation` id extends that conversation's previous turn (its prompt
    and output) with fresh tokens up to prompt_tokens; a first turn (or a request with no
    conversation) with `shared_prefix` starts with that prefix's shared_prefix_tokens
    tokens, the same for every request naming it. Histories of at most `max_conversations`
    conversations are kept (least recently used dropped; a dropped one starts afresh).
    """

    def __init__(self, path: str | Path, vocab_size: int, seed: int = 0,
                 time_scale: float = 1.0, max_conversations: int = 65536) -> None:
        super().__init__(path, vocab_size, seed, time_scale)
        self.max_conversations = max_conversations

    def arrivals(self) -> Iterator[tuple[float, RequestSpec]]:
        history: OrderedDict[str, list[int]] = OrderedDict()
        last = None
        with self.path.open() as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise self._err(n, f"not JSON ({exc.msg})") from None
                if not isinstance(doc, dict):
                    raise self._err(n, "expected a JSON object")
                ts = doc.get("timestamp")
                if not isinstance(ts, (int, float)) or isinstance(ts, bool) or ts < 0:
                    raise self._err(n, f"timestamp: expected seconds >= 0, got {ts!r}")
                if last is not None and ts < last:
                    raise self._err(n, "timestamp: goes back in time (lines must be sorted)")
                last = ts
                fields = {}
                for key in ("prompt_tokens", "output_tokens"):
                    value = doc.get(key)
                    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                        raise self._err(n, f"{key}: expected an integer >= 1, got {value!r}")
                    fields[key] = value
                prompt_len = fields["prompt_tokens"]
                conv = doc.get("conversation")
                conv = None if conv is None else str(conv)
                prev = history.pop(conv, None) if conv is not None else None
                if prev is not None:
                    if prompt_len <= len(prev):
                        raise self._err(n, f"prompt_tokens: {prompt_len} does not extend "
                                           f"conversation {conv!r} ({len(prev)} tokens so far)")
                    prompt = prev + self._fresh(prompt_len - len(prev))
                else:
                    prompt = self._shared(doc, n, prompt_len)
                if conv is not None:
                    history[conv] = prompt + [SYNTHETIC_TOKEN] * fields["output_tokens"]
                    if len(history) > self.max_conversations:
                        history.popitem(last=False)
                yield (float(ts) * self.time_scale,
                       RequestSpec(f"jsonl-{n}", prompt, fields["output_tokens"],
                                   conversation=n))

    def _shared(self, doc: dict, n: int, prompt_len: int) -> list[int]:
        key = doc.get("shared_prefix")
        if key is None:
            return self._fresh(prompt_len)
        k = doc.get("shared_prefix_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= prompt_len:
            raise self._err(n, f"shared_prefix_tokens: expected an integer in "
                               f"[1, prompt_tokens={prompt_len}], got {k!r}")
        return _prefix_tokens(str(key), k, self.low, self.vocab) + self._fresh(prompt_len - k)
