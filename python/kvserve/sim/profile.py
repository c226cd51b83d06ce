"""A device profile: the fitted step-time model of one model shape on one device, plus the
memory model that sizes a replica's KV pool. Written by `kvserve calibrate` as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvserve.sim.fit import StepTimeModel
from kvserve.step_cost import ModelCost

FORMAT = "kvserve-step-profile/1"
SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                "head_dim", "vocab_size")


class ProfileError(ValueError):
    """A profile file that does not parse, or one for another model or device."""


@dataclass(frozen=True)
class MemoryModel:
    """How large a replica's KV pool is. On CUDA: (device bytes x utilisation - non-KV bytes)
    / block bytes, where non-KV bytes (weights, activations, graphs) were measured at
    calibration. On CPU the pool is whatever --kv-cache-memory gives it."""

    device_memory_bytes: int  # 0 on CPU
    non_kv_bytes: int  # 0 on CPU

    def kv_pool_bytes(self, gpu_memory_utilization: float, kv_cache_bytes: int) -> int:
        if self.device_memory_bytes == 0:
            return kv_cache_bytes
        return int(self.device_memory_bytes * gpu_memory_utilization) - self.non_kv_bytes


@dataclass(frozen=True)
class Profile:
    device_type: str  # "cpu" | "cuda"
    device_name: str
    model_name: str
    model_shape: dict[str, int]
    dtype: str
    max_model_len: int
    cost: ModelCost
    step_time: StepTimeModel
    memory: MemoryModel
    fit_error: dict[str, dict[str, float]]
    calibrated: dict[str, str] = field(default_factory=dict)  # date, commit, host, grid
    samples: list[dict[str, Any]] = field(default_factory=list)

    def num_gpu_blocks(self, block_size: int, gpu_memory_utilization: float = 0.9,
                       kv_cache_bytes: int = 512 * 2**20) -> int:
        block_bytes = int(self.cost.kv_bytes_per_token) * block_size
        blocks = self.memory.kv_pool_bytes(gpu_memory_utilization, kv_cache_bytes) // block_bytes
        if blocks < 1:
            raise ValueError(f"gpu_memory_utilization: {gpu_memory_utilization} leaves no room "
                             f"for a KV block of {block_bytes} bytes on {self.device_name}")
        return int(blocks)

    def step_seconds(self, num_tokens: int, num_seqs: int, context_tokens: float,
                     attention_pairs: float) -> float:
        c = self.cost
        return self.step_time.step_time(c.bytes_moved(num_tokens, context_tokens),
                                        c.flops(num_tokens, attention_pairs), num_seqs)

    def ridge_flops_per_byte(self) -> float:
        return self.step_time.compute_flops_per_s / self.step_time.bandwidth_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "device": {"type": self.device_type, "name": self.device_name},
            "model": {"name": self.model_name, "dtype": self.dtype,
                      "max_model_len": self.max_model_len, **self.model_shape},
            "cost": self.cost.to_dict(),
            "step_time": asdict(self.step_time),
            "memory": asdict(self.memory),
            "fit_error": self.fit_error,
            "calibrated": self.calibrated,
            "samples": self.samples,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProfileError(f"profile: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"profile: {path} line {exc.lineno}: not JSON ({exc.msg})") \
                from None
        return cls.from_json(doc, str(path))

    @classmethod
    def from_json(cls, doc: Any, source: str = "profile") -> Profile:
        def need(obj: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise ProfileError(f"{source}: missing field {where}{key}")
            value = obj[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ProfileError(f"{source}: field {where}{key} must be "
                                   f"{getattr(kind, '__name__', 'a number')}, got {value!r}")
            return value

        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ProfileError(f"{source}: field format must be {FORMAT!r}")
        num = (int, float)
        dev, model = need(doc, "device", "", dict), need(doc, "model", "", dict)
        cost_doc, st = need(doc, "cost", "", dict), need(doc, "step_time", "", dict)
        mem = need(doc, "memory", "", dict)
        cost = ModelCost(**{k: float(need(cost_doc, k, "cost.", num))
                            for k in ModelCost.__dataclass_fields__})
        step = StepTimeModel(**{k: float(need(st, k, "step_time.", num))
                                for k in StepTimeModel.__dataclass_fields__})
        for k in ("bandwidth_bytes_per_s", "compute_flops_per_s"):
            if getattr(step, k) <= 0:
                raise ProfileError(f"{source}: field step_time.{k} must be > 0")
        for k in ("step_overhead_s", "seq_overhead_s"):
            if getattr(step, k) < 0:
                raise ProfileError(f"{source}: field step_time.{k} must be >= 0")
        if cost.kv_bytes_per_token <= 0:
            raise ProfileError(f"{source}: field cost.kv_bytes_per_token must be > 0")
        return cls(
            device_type=need(dev, "type", "device.", str),
            device_name=need(dev, "name", "device.", str),
            model_name=need(model, "name", "model.", str),
            model_shape={k: need(model, k, "model.", int) for k in SHAPE_FIELDS},
            dtype=need(model, "dtype", "model.", str),
            max_model_len=need(model, "max_model_len", "model.", int),
            cost=cost, step_time=step,
            memory=MemoryModel(need(mem, "device_memory_bytes", "memory.", int),
                               need(mem, "non_kv_bytes", "memory.", int)),
            fit_error=need(doc, "fit_error", "", dict),
            calibrated=doc.get("calibrated", {}), samples=doc.get("samples", []))

    def check_matches(self, model_shape: dict[str, int] | None = None,
                      device_type: str | None = None, source: str = "profile") -> None:
        """Refuse a profile measured for another model shape or device than the one asked."""
        if device_type is not None and device_type != self.device_type:
            raise ProfileError(f"{source}: measured on {self.device_type} "
                               f"({self.device_name}), not {device_type}")
        if model_shape is not None:
            diff = [f"{k}: profile {self.model_shape.get(k)} vs model {v}"
                    for k, v in model_shape.items() if self.model_shape.get(k) != v]
            if diff:
                raise ProfileError(f"{source}: for another model shape ({'; '.join(diff)})")
