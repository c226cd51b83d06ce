"""The offline API: LLM(model).generate(prompts, params) and LLM.chat(messages, params)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from typing_extensions import Self

from kvserve.engine import LLMEngine
from kvserve.engine_args import EngineArgs
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.tokenizer import Tokenizer

Params = SamplingParams | Sequence[SamplingParams] | None


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._ids = itertools.count()

    def close(self) -> None:
        """Free the engine's device memory now (also on leaving a `with LLM(...)` block)."""
        self.engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | None = None, sampling_params: Params = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None
                 ) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs in input order."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("prompts: give prompts or prompt_token_ids, not both")
        items: list[dict[str, Any]]
        if prompt_token_ids is not None:
            items = [{"prompt": None, "prompt_token_ids": list(p)} for p in prompt_token_ids]
        else:
            texts = [prompts] if isinstance(prompts, str) else list(prompts or [])
            items = [{"prompt": p} for p in texts]
        return self._run(items, sampling_params)

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: Params = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and complete it."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([{"prompt": None, "messages": c} for c in convs], sampling_params)

    def _run(self, items: list[dict[str, Any]], params: Params) -> list[RequestOutput]:
        if params is None:
            plist = [SamplingParams() for _ in items]
        elif isinstance(params, SamplingParams):
            plist = [params] * len(items)
        else:
            plist = list(params)
            if len(plist) != len(items):
                raise ValueError(f"sampling_params: {len(plist)} given for {len(items)} prompts")
        results: dict[str, RequestOutput] = {}
        try:
            for item, p in zip(items, plist):
                state = self.engine.add_request(f"llm-{next(self._ids)}", params=p, **item)
                results[state.request_id] = RequestOutput(
                    state.request_id, prompt_token_ids=list(state.prompt_token_ids))
            pending = set(results)
            while pending:
                for delta in self.engine.step():
                    if delta.request_id in results:
                        results[delta.request_id].merge(delta)
                        if delta.finished:
                            pending.discard(delta.request_id)
        except BaseException:
            for request_id in results:  # leave the engine clean for the next call
                self.engine.abort(request_id)
            raise
        return list(results.values())
