"""The batched sampler against simple per-row Python references, on random logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.sampling import Sampler, SamplingParams
from kvserve.sampling_params import GREEDY_BELOW

V = 50


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    min_tokens_blocked_ids: list[int] = field(default_factory=list)


@pytest.mark.parametrize("field_name,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", 1.1), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("n", 2), ("logprobs", 21), ("seed", -1),
    ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_values_name_the_field(field_name: str, value: object) -> None:
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_min_tokens_is_checked_against_max_tokens_by_the_core_alone() -> None:
    """The relation needs the request's resolved max_tokens, which the core owns: the
    params accept it and the engine's add_request refuses it (tests/test_engine_errors)."""
    assert SamplingParams(max_tokens=3, min_tokens=4).min_tokens == 4
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


def _allowed(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Per-row reference of top-k / top-p / min-p, one token at a time."""
    probs = torch.softmax(logits / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    kept = [i for i in order if i in keep]
    total = sum(probs[i] for i in kept)
    mass, nucleus = 0.0, []
    for i in kept:
        if mass / total > p.top_p:
            break
        nucleus.append(i)
        mass += probs[i]
    top = max(probs)
    return torch.tensor([i for i in nucleus if probs[i] >= p.min_p * top or i == order[0]])


def test_filters_and_distribution_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.6),
              SamplingParams(temperature=1.0, min_p=0.2), SamplingParams(temperature=1.0)]
    logits = torch.randn(len(params), V, generator=gen) * 2
    sampler = Sampler(torch.Generator().manual_seed(1))
    rows = [Row(p) for p in params]
    draws = torch.stack([sampler(logits, rows).token_ids for _ in range(3000)])
    for i, p in enumerate(params):
        allowed = set(_allowed(logits[i], p).tolist())
        seen = set(draws[:, i].tolist())
        assert seen <= allowed, f"row {i} sampled outside the allowed set"
        # Frequencies follow the renormalised distribution over the allowed set.
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        idx = torch.tensor(sorted(allowed))
        want = probs[idx] / probs[idx].sum()
        got = torch.tensor([(draws[:, i] == t).float().mean().item() for t in idx.tolist()])
        assert (got - want).abs().max() < 0.04, (got, want)


def test_greedy_is_argmax_and_mixed_batch() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, V, generator=gen)
    rows = [Row(SamplingParams(temperature=0.0)), Row(SamplingParams(temperature=1.0)),
            Row(SamplingParams(temperature=0.0, top_k=3))] * 2
    out = Sampler(torch.Generator().manual_seed(3))(logits, rows).token_ids
    for i in (0, 2, 3, 5):
        assert out[i] == logits[i].argmax()


def test_penalties_match_reference() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, V, generator=gen) * 3
    rows = [Row(SamplingParams(temperature=0.0, repetition_penalty=1.7, presence_penalty=0.5,
                               frequency_penalty=0.3),
                prompt_token_ids=torch.randint(0, V, (8,), generator=gen).tolist(),
                output_token_ids=torch.randint(0, V, (12,), generator=gen).tolist())
            for _ in range(3)]
    got = Sampler()(logits, rows).token_ids
    for i, r in enumerate(rows):
        ref = logits[i].tolist()
        for t in range(V):
            p = r.params
            if t in r.prompt_token_ids or t in r.output_token_ids:
                penalty = p.repetition_penalty
                ref[t] = ref[t] / penalty if ref[t] > 0 else ref[t] * penalty
            count = r.output_token_ids.count(t)
            ref[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        assert int(got[i]) == max(range(V), key=lambda t: ref[t])


def test_min_tokens_masks_stop_ids() -> None:
    logits = torch.zeros(1, V)
    logits[0, 7] = 10.0  # eos would win
    row = Row(SamplingParams(temperature=0.0, min_tokens=2), min_tokens_blocked_ids=[7])
    assert int(Sampler()(logits, [row]).token_ids[0]) != 7
    row.output_token_ids = [1, 2]
    assert int(Sampler()(logits, [row]).token_ids[0]) == 7


def test_seed_reproducible_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(1, V, generator=gen)
    p = SamplingParams(temperature=1.0, seed=42)

    def run(batch: int, pos: int) -> list[int]:
        row = Row(p, torch.Generator().manual_seed(42))
        others = [Row(SamplingParams(temperature=1.0)) for _ in range(batch - 1)]
        rows = others[:pos] + [row] + others[pos:]
        out = []
        sampler = Sampler(torch.Generator().manual_seed(batch))
        for _ in range(20):
            logits = torch.randn(batch, V, generator=gen)
            logits[pos] = target[0]
            out.append(int(sampler(logits, rows).token_ids[pos]))
        return out

    assert run(1, 0) == run(5, 3) == run(3, 0)


def test_logprobs_are_raw_log_softmax() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, V, generator=gen)
    rows = [Row(SamplingParams(temperature=0.0, logprobs=3)), Row(SamplingParams(temperature=0.0))]
    out = Sampler()(logits, rows)
    assert out.logprobs is not None and out.logprobs[1] is None
    ref = torch.log_softmax(logits[0], dim=-1)
    entry = out.logprobs[0]
    assert set(ref.topk(3).indices.tolist()) <= set(entry)
    for t, lp in entry.items():
        assert math.isclose(lp, float(ref[t]), rel_tol=1e-6, abs_tol=1e-6)


@settings(max_examples=150, deadline=None)
@given(temperature=st.floats(min_value=0.0, max_value=1.7976931348623157e308,
                             allow_subnormal=True) | st.sampled_from(
                                 [5e-324, 1e-300, 1e-45, 1e-38, 9.99e-6, 1e-5, 1e39, 1e308]),
       seed=st.integers(0, 2**31), masked=st.booleans(), top_k=st.sampled_from([0, 3]))
def test_every_temperature_samples_a_token_of_the_distribution(
        temperature: float, seed: int, masked: bool, top_k: int) -> None:
    """Across the whole float range (subnormals too) the token is one the distribution
    softmax(logits / t) gives weight to, in float64; below GREEDY_BELOW it is the argmax."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=gen) * 4
    blocked = [int(logits[0].argmax()), 7] if masked else []  # min_tokens puts -inf in rows
    p = SamplingParams(temperature=temperature, top_k=top_k, min_tokens=2 if masked else 0)
    rows = [Row(p, min_tokens_blocked_ids=blocked) for _ in range(3)]
    tokens = Sampler(gen)(logits, rows).token_ids.tolist()
    ref = logits.double()
    if blocked:
        ref[:, blocked] = float("-inf")
    for row, token in enumerate(tokens):
        assert 0 <= token < V
        assert token not in blocked
        if temperature < GREEDY_BELOW:
            assert token == int(ref[row].argmax()), (temperature, token)
            continue
        weights = torch.softmax(ref[row] / min(temperature, 1e300), dim=-1)
        assert weights[token] > 0 or token == int(ref[row].argmax()), (temperature, token)
