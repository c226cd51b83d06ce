"""Batched sampling in torch: penalties, temperature, top-k/top-p/min-p, per-request seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from kvserve.grammar_mask import apply_grammar_mask
from kvserve.sampling_params import SamplingParams

if TYPE_CHECKING:  # xgrammar loads only when a request asks for structure
    import xgrammar as xgr

__all__ = ["SampleRow", "Sampler", "SamplerOutput", "SamplingParams"]

Logprobs = dict[int, float]  # token id -> log probability (of the model's raw distribution)


class SampleRow(Protocol):
    """What the sampler needs of a request (the engine's request state provides it)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    min_tokens_blocked_ids: list[int]  # eos + stop ids, masked until min_tokens are out
    grammar: xgr.GrammarMatcher | None  # structured output: tokens it forbids are masked


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [N], on the CPU
    logprobs: list[Logprobs | None] | None  # per row, when any row asked for them


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator  # for rows without their own seed

    @staticmethod
    def greedy_only(rows: Sequence[SampleRow]) -> bool:
        """Whether these rows' tokens are the logits' argmax and nothing else is read from
        the logits (the decode graphs may then run the next step ahead)."""
        return all(_plain_greedy(r.params) and r.params.logprobs is None for r in rows)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow],
                 greedy: torch.Tensor | None = None) -> SamplerOutput:
        """logits fp32 [N, V]: one row per sampled sequence, in `rows` order.

        greedy: logits.argmax(-1) when the caller already has it on the device (the decode
        graphs compute it); the all-greedy batch then only copies the token ids to the host.
        """
        params = [r.params for r in rows]
        want_logprobs = any(p.logprobs is not None for p in params)
        raw = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        simple = all(_plain_greedy(p) for p in params)
        if simple:  # the common greedy batch: one argmax, nothing else
            tokens = greedy if greedy is not None else logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits.clone(), rows, params)
        tokens = tokens.cpu()
        out_logprobs = _gather_logprobs(raw, tokens, params) if raw is not None else None
        return SamplerOutput(tokens, out_logprobs)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SampleRow],
                params: list[SamplingParams]) -> torch.Tensor:
        dev = logits.device
        _mask_min_tokens(logits, rows)
        pen = [i for i, p in enumerate(params) if p.needs_penalties]
        if pen:
            _apply_penalties(logits, rows, pen)
        if any(p.structured is not None for p in params):
            apply_grammar_mask(logits, rows)
        result = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return result
        idx = torch.tensor(sampled, device=dev)
        sub = logits[idx]
        temps = torch.tensor([params[i].sampling_temperature for i in sampled], device=dev)
        sub = sub / temps.unsqueeze(1)
        sub = _filter(sub, [params[i] for i in sampled])
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for j, i in enumerate(sampled):
            gen = rows[i].generator
            if gen is not None:  # own stream: same tokens whatever else is in the batch
                noise[j] = torch.empty(probs.shape[1], device=gen.device).exponential_(
                    generator=gen).to(dev)
        # Exponential race: argmax(p / E) draws from p (Gumbel-max in disguise).
        result[idx] = (probs / noise).argmax(dim=-1)
        return result


def _plain_greedy(p: SamplingParams) -> bool:
    """The token is the logits' argmax: greedy, no penalties, no min_tokens or grammar mask."""
    return p.greedy and not p.needs_penalties and p.min_tokens == 0 and p.structured is None


def _mask_min_tokens(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens and r.min_tokens_blocked_ids:
            logits[i, r.min_tokens_blocked_ids] = float("-inf")


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRow], pen: list[int]) -> None:
    """vLLM semantics: repetition over prompt + output; presence/frequency over output only."""
    dev, vocab = logits.device, logits.shape[1]
    out_counts = _counts([rows[i].output_token_ids for i in pen], vocab, dev)
    prompt_seen = _counts([rows[i].prompt_token_ids for i in pen], vocab, dev) > 0
    idx = torch.tensor(pen, device=dev)
    sub = logits[idx]
    rep = torch.tensor([rows[i].params.repetition_penalty for i in pen], device=dev).unsqueeze(1)
    seen = prompt_seen | (out_counts > 0)
    penalised = torch.where(sub > 0, sub / rep, sub * rep)
    sub = torch.where(seen, penalised, sub)
    freq = torch.tensor([rows[i].params.frequency_penalty for i in pen], device=dev).unsqueeze(1)
    pres = torch.tensor([rows[i].params.presence_penalty for i in pen], device=dev).unsqueeze(1)
    sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
    logits[idx] = sub


def _counts(seqs: list[list[int]], vocab: int, dev: torch.device) -> torch.Tensor:
    """Token occurrence counts [len(seqs), vocab] from ragged id lists, in one scatter."""
    width = max((len(s) for s in seqs), default=0)
    padded = torch.full((len(seqs), width), vocab, dtype=torch.int64)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
    counts = torch.zeros(len(seqs), vocab + 1, device=dev)
    counts.scatter_add_(1, padded.to(dev), torch.ones(padded.shape, device=dev))
    return counts[:, :vocab]


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, top-p (nucleus) and min-p, batched; each row keeps at least its best token."""
    dev, vocab = logits.device, logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if bool((top_k < vocab).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=dev).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        drop = before > top_p.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return logits


def _gather_logprobs(raw: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]
                     ) -> list[Logprobs | None]:
    raw = raw.cpu()
    out: list[Logprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        tok = int(tokens[i])
        entry: Logprobs = {tok: float(raw[i, tok])}
        if p.logprobs > 0:
            values, ids = raw[i].topk(p.logprobs)
            for v, t in zip(values.tolist(), ids.tolist()):
                entry.setdefault(t, v)
        out.append(entry)
    return out
