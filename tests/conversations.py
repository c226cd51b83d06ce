"""Multi-turn conversations taken in turns, for host-tier tests: between two turns of one
conversation every other conversation runs a turn, so a small GPU pool has evicted it."""

from __future__ import annotations

from typing import Any

import torch

from kvserve import SamplingParams


def user_turns(num_convs: int, turns: int, lengths: tuple[int, int], vocab: int,
               seed: int) -> list[list[list[int]]]:
    """turns[c][t]: the new user tokens of conversation c's turn t (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(3, vocab, (int(torch.randint(*lengths, (1,), generator=gen)),),
                           generator=gen).tolist() for _ in range(turns)]
            for _ in range(num_convs)]


def run_conversations(llm: Any, turns: list[list[list[int]]],
                      max_tokens: int) -> list[list[list[int]]]:
    """Greedy answers [conversation][turn]; each prompt is the conversation so far (every
    earlier prompt and answer) plus the turn's new tokens."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    history: list[list[int]] = [[] for _ in turns]
    answers: list[list[list[int]]] = [[] for _ in turns]
    for t in range(len(turns[0])):
        for c, conv in enumerate(turns):
            prompt = history[c] + conv[t]
            out = llm.generate(None, params, prompt_token_ids=[prompt])[0]
            answers[c].append(list(out.token_ids))
            history[c] = prompt + list(out.token_ids)
    return answers
