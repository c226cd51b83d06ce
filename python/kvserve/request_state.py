"""The engine's per-request bookkeeping: ids, params, RNG, detokenizer and stop strings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvserve.detokenizer import IncrementalDetokenizer
from kvserve.outputs import Logprobs, RequestOutput
from kvserve.sampling_params import SamplingParams
from kvserve.stop_strings import StopStringMatcher

if TYPE_CHECKING:  # xgrammar loads only when a request asks for structure
    import xgrammar as xgr

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    request_id: str
    handle: int
    params: SamplingParams
    prompt_token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher
    generator: torch.Generator | None = None
    min_tokens_blocked_ids: list[int] = field(default_factory=list)
    grammar: xgr.GrammarMatcher | None = None  # structured output: advanced by every token
    output_token_ids: list[int] = field(default_factory=list)
    hit_stop_string: bool = False

    def append(self, token: int, logprobs: Logprobs | None) -> tuple[RequestOutput, bool]:
        """Take one committed token; return its delta and whether the request should stop
        here (a stop string matched, or the structured output's grammar ended)."""
        self.output_token_ids.append(token)
        # Stop strings, like EOS and stop ids, end a request only after min_tokens tokens.
        armed = len(self.output_token_ids) > self.params.min_tokens
        text, stopped = self.stop.feed(self.detokenizer.add([token]), armed)
        self.hit_stop_string = self.hit_stop_string or stopped
        delta = RequestOutput(self.request_id, text, [token],
                              [logprobs] if logprobs is not None else None)
        return delta, self._advance_grammar(token) or stopped

    def _advance_grammar(self, token: int) -> bool:
        """Feed the token to the grammar; True when the grammar has ended."""
        if self.grammar is None:
            return False
        if not self.grammar.accept_token(token):
            # The mask only lets allowed tokens through, so this is a defect; stop cleanly.
            log.error("request %s: grammar refused token %d", self.request_id, token)
            return True
        return bool(self.grammar.is_terminated())

    def finish(self, delta: RequestOutput, reason: str, cached_prompt_tokens: int) -> None:
        """Mark `delta` as the final item: release held-back text, fill in the counts."""
        if not self.hit_stop_string:  # after a stop string, nothing more is shown
            tail, _ = self.stop.feed(self.detokenizer.flush())
            delta.text += tail + self.stop.flush()
        delta.finished, delta.finish_reason = True, reason
        delta.num_prompt_tokens = len(self.prompt_token_ids)
        delta.num_completion_tokens = len(self.output_token_ids)
        delta.num_cached_prompt_tokens = cached_prompt_tokens
