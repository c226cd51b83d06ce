"""How many bytes of text one token can stand for, proven from a tokenizer's structure.

With that bound L, a text of B UTF-8 bytes encodes to at least ceil(B / L) tokens, so a
prompt that cannot fit in max_model_len is refused before it is tokenized. The bound holds
only when no stage of the pipeline can drop or shrink text:

- normalizer: none, or only Prepend / Replace(string -> string at least as long); Unicode
  normal forms, lowercasing and stripping can shrink text (NFC composes three Hangul jamo
  into one syllable, the Kelvin sign lowercases to "k");
- pre-tokenizer: splitters that keep every piece (ByteLevel, Metaspace, Split and
  Punctuation unless they remove, Digits, UnicodeScripts); Whitespace/BERT-style ones drop
  whitespace;
- model: BPE in which no run of unknown characters is fused into one token, and which drops
  no character silently except, under ByteLevel, the bytes missing from its alphabet
  (SmolLM2's lacks some control bytes and the 0xF1/0xF2 lead bytes): those are counted in
  the text and left out, since a dropped byte ends up in no token;
- added tokens without lstrip/rstrip (those swallow any run of whitespace beside them);
- no truncation (encode would stop early).

Each token then covers at most its own spelling: its UTF-8 length, or under ByteLevel, its
number of characters (each stands for one byte). Anything else gives None: no bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Punctuation", "Digits",
                           "UnicodeScripts"}
_MAX_CHAR_BYTES = 4  # one unknown character becomes one unk token


@dataclass(frozen=True)
class TokenBound:
    max_bytes_per_token: int
    dropped_bytes: bytes = b""  # byte values the model drops (they are in no token)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens `text` encodes to."""
        data = text.encode("utf-8")
        kept = len(data.translate(None, self.dropped_bytes)) if self.dropped_bytes else len(data)
        return -(-kept // self.max_bytes_per_token)


def token_bound(hf: HFTokenizer) -> TokenBound | None:
    spec = json.loads(hf.to_str())
    if spec.get("truncation") is not None or not _normalizer_keeps(spec.get("normalizer")):
        return None
    pre = spec.get("pre_tokenizer")
    if not _pre_tokenizer_keeps(pre):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    byte_level = _uses(pre, "ByteLevel")
    vocab = hf.get_vocab(with_added_tokens=True)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    every_byte = {f"<0x{b:02X}>" for b in range(256)}
    dropped = b""
    if byte_level and model.get("unk_token") is None:
        unknown_bytes = 0  # every byte is its own symbol, or dropped
        dropped = bytes(sorted(b for b, c in bytes_to_unicode().items() if c not in vocab))
    elif model.get("byte_fallback") and every_byte <= vocab.keys():
        unknown_bytes = 1  # an unknown character becomes its bytes' tokens
    elif model.get("unk_token") is not None and not model.get("fuse_unk"):
        unknown_bytes = _MAX_CHAR_BYTES
    else:
        return None
    widest = max((_covered_bytes(t, byte_level, alphabet) for t in vocab), default=1)
    return TokenBound(max(widest, unknown_bytes, 1), dropped)


def _covered_bytes(token: str, byte_level: bool, alphabet: set[str]) -> int:
    if byte_level and set(token) <= alphabet:
        return len(token)
    return len(token.encode("utf-8"))


def _normalizer_keeps(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_normalizer_keeps(s) for s in spec.get("normalizers", []))
    if kind == "Prepend":
        return True
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}), spec.get("content", "")
        text = pattern.get("String")
        return bool(text) and len(content.encode("utf-8")) >= len(text.encode("utf-8"))
    return False


def _pre_tokenizer_keeps(spec: dict[str, Any] | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps(s) for s in spec.get("pretokenizers", []))
    return kind in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _uses(spec: dict[str, Any] | None, kind: str) -> bool:
    if spec is None:
        return False
    if spec.get("type") == "Sequence":
        return any(_uses(s, kind) for s in spec.get("pretokenizers", []))
    return spec.get("type") == kind


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
