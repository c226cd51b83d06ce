"""The structured-output token mask: logits of tokens a row's grammar forbids become -inf."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # imported where a mask is built: only structured requests need xgrammar
    import xgrammar as xgr


class GrammarRow(Protocol):
    grammar: xgr.GrammarMatcher | None  # None: the row is unconstrained


def grammar_bitmask(rows: Sequence[GrammarRow], vocab_size: int) -> torch.Tensor | None:
    """int32 [len(rows), ceil(vocab / 32)] on the CPU, bit set = allowed; rows without a
    grammar allow everything. None when no row has a grammar."""
    idx = _constrained(rows)
    if not idx:
        return None
    return _fill(rows, idx, vocab_size)


def _constrained(rows: Sequence[GrammarRow]) -> list[int]:
    return [i for i, r in enumerate(rows) if r.grammar is not None]


def _fill(rows: Sequence[GrammarRow], idx: list[int], vocab_size: int) -> torch.Tensor:
    import xgrammar as xgr

    matchers = [m for i in idx if (m := rows[i].grammar) is not None]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab_size)  # all ones
    if len(idx) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, idx[0])
    else:  # the rows' fills run in parallel in xgrammar's own threads
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, indices=idx)
    return bitmask


def apply_grammar_mask(logits: torch.Tensor, rows: Sequence[GrammarRow]) -> None:
    """In place on logits [len(rows), V] (CPU or CUDA); a no-op when no row has a grammar."""
    idx = _constrained(rows)
    if not idx:
        return
    import xgrammar as xgr

    bitmask = _fill(rows, idx, logits.shape[1])
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=logits.shape[1], indices=idx)


@cache
def _batch_matcher() -> xgr.BatchGrammarMatcher:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher()
