"""`kvserve calibrate`: time the real engine over a grid of step shapes and fit the profile.

Each grid point is run through LLMEngine.step() (schedule, forward, sample, commit), and
every step is a sample, classed by its shape: decode (every sequence decodes), prefill (none
does) or mixed. Decode batches at a context length share one cached prompt (each request
differs in its last token), so setting up a batch of B costs one prefill, not B.
"""

from __future__ import annotations

import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvserve.outputs import StepStats
from kvserve.sim.fit import FitResult, StepSample, fit_step_time
from kvserve.sim.profile import SHAPE_FIELDS, MemoryModel, Profile


@dataclass(frozen=True)
class Grid:
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_lens: tuple[int, ...]
    cached_prefixes: tuple[int, ...]  # chunked prefill: new tokens over a cached prefix
    mixed_chunks: tuple[int, ...]  # a prefill chunk joining a running decode batch
    decode_steps: int = 6
    repeats: int = 2

    @classmethod
    def for_device(cls, device_type: str, max_model_len: int, max_num_seqs: int,
                   token_budget: int) -> Grid:
        batches: tuple[int, ...]
        if device_type == "cuda":
            batches, ctxs = (1, 8, 32, 64, 128, 256), (256, 1024, 4096)
            prefills, chunks = (128, 512, 2048, 4096), (256, 1024)
        else:
            batches, ctxs = (1, 4, 16, 32), (64, 256, 768)
            prefills, chunks = (32, 128, 512, 1024), (64, 256)
        room = max_model_len - 64
        return cls(
            decode_batches=tuple(b for b in batches if b <= max_num_seqs),
            contexts=tuple(c for c in ctxs if c < room),
            prefill_lens=tuple(p for p in prefills if p <= min(token_budget, room)),
            cached_prefixes=tuple(c for c in ctxs if c + 256 < room),
            mixed_chunks=tuple(c for c in chunks if c < token_budget // 2))


def shape_class(stats: StepStats) -> str:
    if stats.num_prefill_tokens == 0:
        return "decode"
    return "prefill" if stats.num_decodes == 0 else "mixed"


class GridRunner:
    """Drives one LLMEngine through the grid, collecting every step as a sample."""

    def __init__(self, engine: object, seed: int = 0) -> None:
        from kvserve.sampling_params import SamplingParams

        self.engine = engine
        self.params = SamplingParams
        self.rng = np.random.default_rng(seed)
        self.samples: list[StepSample] = []
        self._recording = False
        self._count = 0
        tok_vocab = getattr(engine.tokenizer, "vocab_size", engine.vocab_size)  # type: ignore[attr-defined]
        self.vocab = int(min(engine.vocab_size, tok_vocab))  # type: ignore[attr-defined]
        engine.add_step_listener(self._on_step)  # type: ignore[attr-defined]

    def _on_step(self, s: StepStats) -> None:
        if self._recording:
            self.samples.append(StepSample(shape_class(s), s.num_seqs, s.num_tokens,
                                           s.bytes_estimate, s.flops_estimate, s.duration_s))

    def _tokens(self, n: int) -> list[int]:
        low = min(16, self.vocab // 4)
        return self.rng.integers(low, self.vocab, size=n).tolist()

    def _add(self, ids: list[int], max_tokens: int) -> str:
        self._count += 1
        rid = f"calibrate-{self._count}"
        params = self.params(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(rid, None, params, prompt_token_ids=ids)  # type: ignore[attr-defined]
        return rid

    def _drain(self) -> None:
        while self.engine.has_unfinished():  # type: ignore[attr-defined]
            self.engine.step()  # type: ignore[attr-defined]

    def warm_up(self) -> None:
        self._recording = False
        self._add(self._tokens(32), 4)
        self._drain()

    def decode_group(self, batch: int, context: int, steps: int, chunks: tuple[int, ...]) -> None:
        """`batch` decodes at `context` for `steps` steps; a prefill chunk joins some steps."""
        self._recording = True
        shared = self._tokens(context - 1)
        self._add(shared + self._tokens(1), steps + len(chunks) + 4)
        self.engine.step()  # type: ignore[attr-defined]  # the shared prompt, now cached
        for _ in range(batch - 1):
            self._add(shared + self._tokens(1), steps + len(chunks) + 2)
        for i in range(steps + len(chunks)):
            if i % 2 == 1 and i // 2 < len(chunks):
                self._add(self._tokens(chunks[i // 2]), 1)
            self.engine.step()  # type: ignore[attr-defined]
        self._drain()

    def prefill(self, length: int, cached_prefix: int = 0) -> None:
        self._recording = cached_prefix == 0
        prefix = self._tokens(cached_prefix)
        if cached_prefix:
            self._add(prefix, 1)
            self._drain()
            self._recording = True
        self._add(prefix + self._tokens(length), 1)
        self._drain()

    def run(self, grid: Grid, progress: bool = True) -> list[StepSample]:
        from tqdm import tqdm

        self.warm_up()
        points = [("decode", b, c) for c in grid.contexts for b in grid.decode_batches]
        points += [("prefill", p, 0) for p in grid.prefill_lens]
        points += [("chunked", 256, c) for c in grid.cached_prefixes]
        for _ in tqdm(range(grid.repeats), desc="calibrate", disable=not progress):
            for kind, a, b in points:
                if kind == "decode":
                    self.decode_group(a, b, grid.decode_steps, grid.mixed_chunks)
                else:
                    self.prefill(a, b)
        self._recording = False
        return self.samples


def model_shape(cfg: object) -> dict[str, int]:
    """The fields of a ModelConfig a profile must match."""
    return {k: int(getattr(cfg, k)) for k in SHAPE_FIELDS}


def _device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def calibrate(engine: object, grid: Grid, seed: int = 0, progress: bool = True
              ) -> tuple[Profile, FitResult]:
    """Run the grid on `engine` (an LLMEngine) and fit its profile."""
    samples = GridRunner(engine, seed).run(grid, progress)
    fit = fit_step_time(samples)
    e = engine
    cfg = e.runner.config  # type: ignore[attr-defined]
    device_type = e.device.type  # type: ignore[attr-defined]
    memory = MemoryModel(0, 0)
    if device_type == "cuda":
        import torch

        total = int(torch.cuda.get_device_properties(e.device).total_memory)  # type: ignore[attr-defined]
        pool = e.runner.num_blocks * e.runner.block_bytes  # type: ignore[attr-defined]
        util = e.args.gpu_memory_utilization  # type: ignore[attr-defined]
        memory = MemoryModel(total, int(total * util) - int(pool))
    shape = model_shape(cfg)
    profile = Profile(
        device_type=device_type, device_name=_device_name(device_type),
        model_name=e.model_name, model_shape=shape,  # type: ignore[attr-defined]
        dtype=str(e.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
        max_model_len=int(e.max_model_len), cost=e.cost,  # type: ignore[attr-defined]
        step_time=fit.model, memory=memory, fit_error=fit.error_by_class,
        calibrated={"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "commit": _commit(), "host": platform.node(),
                    "grid": repr(grid)},
        samples=[{"class": s.shape_class, "seqs": s.num_seqs, "tokens": s.num_tokens,
                  "bytes": s.bytes_moved, "flops": s.flops, "seconds": s.duration_s}
                 for s in samples])
    return profile, fit


def refit(path: str) -> Profile:
    """The profile at `path` with its step-time model fitted again to its own samples."""
    from dataclasses import replace

    from kvserve.sim.profile import ProfileError

    profile = Profile.load(path)
    try:
        samples = [StepSample(s["class"], int(s["seqs"]), int(s["tokens"]), float(s["bytes"]),
                              float(s["flops"]), float(s["seconds"])) for s in profile.samples]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{path}: field samples: malformed step ({exc})") from None
    fit = fit_step_time(samples)
    calibrated = {**profile.calibrated, "refit": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                               time.gmtime())}
    return replace(profile, step_time=fit.model, fit_error=fit.error_by_class,
                   calibrated=calibrated)


def format_fit(profile: Profile) -> str:
    st = profile.step_time
    lines = [
        (f"device {profile.device_name} ({profile.device_type}), model {profile.model_name} "
        f"{profile.dtype}, {len(profile.samples)} steps"),
        (f"bandwidth {st.bandwidth_bytes_per_s / 1e9:.2f} GB/s, compute "
        f"{st.compute_flops_per_s / 1e12:.3f} TFLOP/s (ridge "
        f"{profile.ridge_flops_per_byte():.1f} FLOP/B), per step "
        f"{st.step_overhead_s * 1e3:.3f} ms, per sequence {st.seq_overhead_s * 1e6:.1f} us"),
        (f"{'class':>8} {'steps':>6} {'median |err| %':>15} {'mean |err| %':>13} "
        f"{'max |err| %':>12}"),
    ]
    for name, e in profile.fit_error.items():
        lines.append(f"{name:>8} {int(e['n']):>6} {e.get('median_abs_pct', float('nan')):>15.1f} "
                     f"{e['mape']:>13.1f} {e['max_abs_pct']:>12.1f}")
    return "\n".join(lines)
