"""Incremental detokenization: text deltas that never split a UTF-8 character."""

from __future__ import annotations

from kvserve.tokenizer import Tokenizer

# Prompt tokens decoded as left context so the first output token's leading space survives
# (SentencePiece drops it when a token is decoded alone).
_CONTEXT = 5


class IncrementalDetokenizer:
    """Decodes a growing id list; `add` returns only the newly completed text.

    Re-decodes a short window [prefix_offset:] each step (not the whole output) and holds
    back text ending in U+FFFD, i.e. a multi-byte character whose bytes have not all arrived.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete character: wait for more bytes
        delta = full[len(prefix):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta

    def flush(self) -> str:
        """At the end: whatever is held back (a truly invalid byte sequence shows as U+FFFD)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""
