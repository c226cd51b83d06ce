"""The bytes-per-token bound that lets a too-long prompt be refused before tokenizing: on
random texts it never exceeds the real token count, and tokenizers that can drop or shrink
text get no bound."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers

from kvserve.default_model import default_model_path
from kvserve.model import load_checkpoint
from kvserve.tokenizer import Tokenizer as KvTokenizer
from kvserve.tokenizer import bytes_to_unicode
from tiny_models import CORPUS, SPECIALS, build_tokenizer

# whitespace runs, control bytes, astral characters (0xF1/0xF2 lead bytes), specials
PIECES = ["ab ", "    ", "\n\n", "\t", "\x04", "\x1d\x13", "\U00050000", "\U000a0000", "🙂",
          "日本語", "Grüße", "<s>", "</s>", "The quick brown fox", "0123456789", " ", "\r\n"]
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)), max_size=40).map(
    "".join) | st.text(max_size=300)


def _smollm2() -> KvTokenizer:
    try:
        return load_checkpoint(str(default_model_path())).tokenizer
    except RuntimeError as exc:  # no network and not installed
        pytest.skip(f"default model unavailable: {exc}")


def _sentencepiece() -> KvTokenizer:
    """Llama-2 style from GGUF metadata: Metaspace, byte fallback, fused unk."""
    pieces = ["▁", "▁t", "he", "▁the", "▁qu", "ick", "▁quick", "▁fox", "▁▁", "▁▁▁▁", "ab"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    return KvTokenizer.from_gguf_metadata(meta, "sentencepiece test")


def _gaps_in_alphabet() -> KvTokenizer:
    """Byte-level BPE whose alphabet lacks bytes (they are dropped, as in SmolLM2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    spell = bytes_to_unicode()
    alphabet = [spell[b] for b in range(256) if b not in (0x04, 0x1D, 0xF1, 0xF2, 0x20)]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=alphabet, show_progress=False,
                                  limit_alphabet=len(alphabet))
    tok.train_from_iterator([c.replace(" ", "") for c in CORPUS], trainer)
    return KvTokenizer(tok)


@pytest.fixture(scope="module", params=["tiny", "smollm2", "sentencepiece", "gaps"])
def tokenizer(request: pytest.FixtureRequest) -> KvTokenizer:
    made = {"tiny": lambda: KvTokenizer(build_tokenizer()), "smollm2": _smollm2,
            "sentencepiece": _sentencepiece, "gaps": _gaps_in_alphabet}[request.param]()
    assert made.bound is not None
    return made


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(text=TEXTS, repeat=st.sampled_from([1, 1, 7, 50]))
def test_the_bound_never_exceeds_the_token_count(tokenizer: KvTokenizer, text: str,
                                                 repeat: int) -> None:
    text = text * repeat
    for add_special in (True, False):
        assert tokenizer.fewest_tokens(text) <= len(tokenizer.encode(text, add_special)), text


def test_dropped_bytes_are_found_and_left_out() -> None:
    tok = _gaps_in_alphabet()
    assert tok.bound is not None
    assert set(tok.bound.dropped_bytes) >= {0x04, 0x1D, 0xF1, 0xF2, 0x20}
    assert tok.encode("\x04" * 1000, add_special_tokens=False) == []  # what makes it needed
    assert tok.fewest_tokens("\x04" * 1000) == 0


def test_encode_is_the_libraries_encode(tokenizer: KvTokenizer) -> None:
    text = "The quick brown fox <s> jumps\n\n  over 🙂 日本語"
    assert tokenizer.encode(text) == tokenizer.hf.encode(text).ids


def _byte_level(**parts: object) -> Tokenizer:
    tok = build_tokenizer()
    for name, value in parts.items():
        setattr(tok, name, value)
    return tok


@pytest.mark.parametrize("make", [
    lambda: _byte_level(normalizer=normalizers.NFC()),  # composes jamo: text shrinks
    lambda: _byte_level(normalizer=normalizers.Lowercase()),  # Kelvin sign -> "k"
    lambda: _byte_level(normalizer=normalizers.Strip()),
    lambda: _byte_level(normalizer=normalizers.Replace("  ", " ")),
    lambda: _byte_level(pre_tokenizer=pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    lambda: _byte_level(pre_tokenizer=pre_tokenizers.Split(" ", behavior="removed")),
], ids=["nfc", "lowercase", "strip", "replace-shorter", "whitespace-split", "split-removed"])
def test_tokenizers_that_can_shrink_text_get_no_bound(make: object) -> None:
    tok = KvTokenizer(make())  # type: ignore[operator]
    assert tok.bound is None
    assert tok.fewest_tokens("a" * 10_000) == 0


def test_lstrip_tokens_truncation_and_fused_unk_get_no_bound() -> None:
    lstrip = build_tokenizer()
    lstrip.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert KvTokenizer(lstrip).bound is None
    truncating = build_tokenizer()
    truncating.enable_truncation(64)
    assert KvTokenizer(truncating).bound is None
    fused = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>",
                                 fuse_unk=True))
    assert fused.encode("xyzxyzxyz").ids == [0]  # a run of unknown characters, one token
    assert KvTokenizer(fused).bound is None
    unfused = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    assert KvTokenizer(unfused).bound is not None


def test_the_growing_llama2_normalizer_keeps_a_bound(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    kv = KvTokenizer(tok)
    assert kv.bound is not None
    for text in ("a  b", "    " * 100, "The quick brown fox " * 20):
        assert kv.fewest_tokens(text) <= len(kv.encode(text))
