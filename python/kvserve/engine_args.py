"""EngineArgs: every engine knob, shared by `kvserve generate`, the server and LLM(...)."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kvserve.attention.kv_quant import KV_CACHE_DTYPES

if TYPE_CHECKING:
    from kvserve.sim.profile import Profile

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}
DTYPES = ("auto", "float32", "bfloat16", "float16")
PREEMPTION_MODES = ("auto", "recompute", "swap")
EXECUTORS = ("model", "sim")
DEFAULT_TOKEN_BUDGET = 2048  # "auto" with neither a profile nor known device peaks
log = logging.getLogger(__name__)


def parse_size(value: str | float, field_name: str) -> int:
    """'512MiB', '2GB', '1e9' or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{field_name}: must be >= 0 bytes, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{field_name}: cannot parse size {value!r} (e.g. 512MiB, 2GB, 1e9)")
    return int(float(m.group(1)) * _UNITS[unit])


def _budget(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


@dataclass
class EngineArgs:
    model: str | None = None  # HF directory or .gguf file; None: the embedded SmolLM2
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str | None = None  # None: cuda when available, else cpu
    block_size: int = 16
    max_num_seqs: int = 256
    # "auto": the roofline's (from --profile, else the device's datasheet peaks and the
    # model's dimensions, resolved by the engine) under --itl-target
    max_num_batched_tokens: int | str = "auto"
    max_model_len: int | None = None  # None: the model's own limit
    max_waiting: int = 4096
    kv_cache_memory: str | int = "512MiB"  # CPU only: KV pool size
    kv_cache_dtype: str = "auto"  # what the KV cache stores; auto: the model dtype
    gpu_memory_utilization: float = 0.90  # CUDA: fraction of device memory kvserve may use
    swap_space: str | int = "1GiB"  # host pool for swapped-out KV blocks
    # Host tier under the prefix cache (evicted blocks kept in host memory); None: the
    # device's default (host_tier.py: off on CPU, on CUDA a quarter of available memory
    # capped at 32 GiB); 0 turns it off.
    host_kv_cache: str | int | None = None
    num_gpu_blocks_override: int | None = None  # a GPU pool of exactly this many blocks
    enable_prefix_caching: bool = True
    preemption_mode: str = "auto"
    attention_backend: str | None = None  # None: cuda on CUDA devices, else torch
    enforce_eager: bool = False  # CUDA: no decode graphs, every step launched eagerly
    seed: int = 0  # for requests without their own seed
    executor: str = "model"  # "sim": steps sleep the profile's modelled time, no weights
    profile: str | None = None  # a `kvserve calibrate` profile (auto token budget, sim)
    itl_target: float = 0.05  # seconds; what the auto token budget keeps a mixed step under

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} is not one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode: {self.preemption_mode!r} is not one of "
                             f"{', '.join(PREEMPTION_MODES)}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor: {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.max_num_batched_tokens == "auto" and self.profile is not None:
            from kvserve.sim.profile import Profile

            self.resolve_token_budget(Profile.load(self.profile))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            value = getattr(self, name)
            if name == "max_num_batched_tokens" and value == "auto":
                continue  # resolved once the model and device are known
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be >= 2, got {self.max_model_len!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization: must be in (0, 1], got "
                             f"{self.gpu_memory_utilization!r}")
        self.kv_cache_bytes = parse_size(self.kv_cache_memory, "kv_cache_memory")
        self.swap_bytes = parse_size(self.swap_space, "swap_space")
        self.host_kv_cache_bytes = (None if self.host_kv_cache in (None, "auto")
                                    else parse_size(self.host_kv_cache, "host_kv_cache"))
        override = self.num_gpu_blocks_override
        if override is not None and (not isinstance(override, int) or isinstance(override, bool)
                                     or override < 1):
            raise ValueError("num_gpu_blocks_override: must be a positive integer, got "
                             f"{override!r}")

    def resolve_token_budget(self, profile: Profile | None, max_model_len: int | None = None,
                             device_name: str = "") -> int:
        """The token budget as a number: as given, or for "auto" the largest whose modelled
        mixed step stays under --itl-target, modelled by `profile` (a calibration, or the
        datasheet roofline from `budget.datasheet_profile`). Without either, the default.
        Logs the choice and why; the result replaces "auto"."""
        if self.max_num_batched_tokens != "auto":
            return int(self.max_num_batched_tokens)
        if profile is None:
            budget = DEFAULT_TOKEN_BUDGET
            log.info("max_num_batched_tokens auto = %d: no profile (--profile) and no datasheet "
                     "peaks for %s, so no ridge point to size it by; the default", budget,
                     device_name or "this device")
        else:
            from kvserve.sim.budget import auto_token_budget

            context = min(1024, max_model_len or self.max_model_len or profile.max_model_len)
            choice = auto_token_budget(profile, self.itl_target, self.max_num_seqs, context,
                                       self.block_size)
            budget = choice.max_num_batched_tokens
            source = profile.calibrated.get("source", "the calibrated profile")
            log.info("max_num_batched_tokens auto = %d (%s): %s", budget, source, choice.reason)
        self.max_num_batched_tokens = budget
        return budget

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the engine options; one the command already defines (e.g. --seed) is kept."""
        d = EngineArgs.__dataclass_fields__
        g = parser.add_argument_group("engine")
        taken = set(parser._option_string_actions)

        def add(flag: str, **kwargs: object) -> None:
            if flag not in taken:
                g.add_argument(flag, **kwargs)  # type: ignore[arg-type]

        add("--model", default=None,
            help="HF model directory or .gguf file (default: embedded SmolLM2-135M)")
        add("--dtype", default="auto", choices=DTYPES)
        add("--device", default=None, help="cuda, cuda:N or cpu (default: auto)")
        for name, kind, text in (
            ("block-size", int, "tokens per KV block"),
            ("max-num-seqs", int, "most sequences in one step"),
            ("max-model-len", int, "longest prompt + output (default: the model's)"),
            ("max-waiting", int, "waiting-queue size before requests are refused"),
            ("gpu-memory-utilization", float, "fraction of GPU memory to use"),
            ("seed", int, "seed for requests without one"),
        ):
            add(f"--{name}", type=kind, default=d[name.replace("-", "_")].default, help=text)
        add("--max-num-batched-tokens", type=_budget, default=d["max_num_batched_tokens"].default,
            help="most new tokens in one step, or 'auto' (default): the most whose modelled "
                 "mixed step stays under --itl-target, modelled by --profile or else by the "
                 "device's datasheet roofline and the model's dimensions")
        add("--profile", default=None, help="`kvserve calibrate` profile JSON")
        add("--executor", default="model", choices=EXECUTORS,
            help="sim: the real engine and core with modelled step times and synthetic "
                 "tokens (needs --profile; no weights loaded)")
        add("--itl-target", type=float, default=d["itl_target"].default,
            help="seconds a mixed step may take, for --max-num-batched-tokens auto")
        add("--kv-cache-memory", default="512MiB", help="CPU KV-cache size, e.g. 512MiB, 2GB")
        add("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
            help="what the KV cache stores (auto: the model dtype; fp8_e4m3 halves its bytes, "
                 "with per layer and KV head scales calibrated at start)")
        add("--swap-space", default="1GiB", help="host swap pool size, e.g. 4GiB")
        add("--host-kv-cache", default=None,
            help="host-memory tier under the prefix cache, e.g. 16GiB (0: off; default: off "
                 "on CPU, on CUDA 1/4 of available host memory up to 32GiB, pinned)")
        add("--num-gpu-blocks-override", type=int, default=None,
            help="use exactly this many GPU KV blocks (tests and benchmarks of a small pool)")
        add("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
            help="disable prefix caching")
        add("--preemption-mode", default="auto", choices=PREEMPTION_MODES)
        add("--attention-backend", default=None, choices=("torch", "cuda"))
        add("--enforce-eager", action="store_true",
            help="CUDA: launch every step eagerly (no captured decode graphs)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                      if hasattr(args, f.name)})
