"""Where the load goes: the engine in this process, or a kvserve server over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from kvserve.bench.driver import StreamEvent
from kvserve.bench.workloads import RequestSpec


class EngineClient:
    """Drives an AsyncEngine in this process (no network in the measurement)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        from kvserve.sampling import SamplingParams

        # ignore_eos: the workload, not the model, decides how long each answer is.
        params = SamplingParams(temperature=0.0, max_tokens=spec.max_tokens, ignore_eos=True)
        stream = self.engine.generate(
            None, params, request_id=spec.request_id, prompt_token_ids=spec.prompt_token_ids
        )
        async for out in stream:
            yield StreamEvent(
                token_ids=list(out.token_ids),
                finished=out.finished,
                finish_reason=out.finish_reason,
                cached_prompt_tokens=getattr(out, "num_cached_prompt_tokens", 0) or 0,
            )

    async def load(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.engine.load().items() if _is_number(v)}

    async def limits(self) -> tuple[int, int]:
        """(vocab size, max model len) of the served model."""
        info = self.engine.model_info
        # Ids must be valid for both the embedding table and the tokenizer.
        vocab = min(self.engine.tokenizer.vocab_size, self.engine.engine.vocab_size)
        return int(vocab), int(info["max_model_len"])

    async def close(self) -> None:
        """The engine was started for the run: shut it down with the client."""
        await self.engine.shutdown()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
