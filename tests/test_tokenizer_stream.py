"""Incremental detokenization and stop strings, on random inputs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvserve.detokenizer import IncrementalDetokenizer
from kvserve.model import load_checkpoint
from kvserve.stop_strings import StopStringMatcher
from kvserve.tokenizer import Tokenizer

TEXTS = ["Grüße aus München! 日本語のテキスト 🙂🚀 and more.",
         "The quick brown fox jumps over the lazy dog.", "numbers 0123456789 ( ) [ ] 🙂"]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Tokenizer:
    return load_checkpoint(tiny_llama_dir).tokenizer


def test_deltas_concatenate_to_the_full_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    vocab = tokenizer.vocab_size
    for trial in range(30):
        if trial % 2:  # real text: multi-byte characters split over byte-level tokens
            ids = tokenizer.encode(rng.choice(TEXTS), add_special_tokens=False)
        else:  # random ids, including invalid UTF-8 byte sequences
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]
        prompt = tokenizer.encode("prompt text", add_special_tokens=False)
        det = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [det.add([t]) for t in ids]
        text = "".join(deltas) + det.flush()
        assert text == tokenizer.decode(ids)
        for d in deltas:  # a held-back character is never shown half-way
            assert "\ufffd" not in d or "\ufffd" in tokenizer.decode(ids)


def test_multibyte_character_is_held_until_complete(tokenizer: Tokenizer) -> None:
    emoji_ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1  # byte-level BPE: the emoji spans several tokens
    det = IncrementalDetokenizer(tokenizer, [])
    assert [det.add([t]) for t in emoji_ids[:-1]] == [""] * (len(emoji_ids) - 1)
    assert det.add(emoji_ids[-1:]) == "🙂"


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_strings_random_splits() -> None:
    rng = random.Random(3)
    alphabet = "ab c."
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        got, hit = _stream(stops, pieces)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        # Reference: everything before the earliest stop string, or all of it.
        assert hit == bool(hits)
        assert got == (text[: min(hits)] if hits else text), (text, stops, pieces)


def test_partial_stop_prefix_is_held_back() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    m = StopStringMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)
    assert m.feed("ay") == ("STay", False)


def test_chat_template_renders(tokenizer: Tokenizer) -> None:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>user: hi</s><s>assistant: "
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template([{"content": "no role"}])


def stop_reference(stops: list[str], pieces: list[str], armed_from: int) -> tuple[str, bool]:
    """Piece j may end the text only if j >= armed_from; it ends at the earliest-starting
    occurrence of a stop string that ends inside piece j."""
    text = "".join(pieces)
    after = 0
    for j, piece in enumerate(pieces):
        before, after = after, after + len(piece)
        if j < armed_from:
            continue
        starts = [i for s in stops for i in range(len(text)) if text.startswith(s, i)
                  and before < i + len(s) <= after]
        if starts:
            return text[: min(starts)], True
    return text, False


def test_stop_strings_are_ignored_until_armed() -> None:
    rng = random.Random(5)
    alphabet = "ab c."
    for _ in range(500):
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
                  for _ in range(rng.randint(1, 10))]
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        armed_from = rng.randint(0, len(pieces))
        m = StopStringMatcher(stops)
        out, hit = [], False
        for j, p in enumerate(pieces):
            text, hit = m.feed(p, armed=j >= armed_from)
            out.append(text)
            if hit:
                break
        got = "".join(out) + ("" if hit else m.flush())
        assert (got, hit) == stop_reference(stops, pieces, armed_from), (pieces, stops,
                                                                         armed_from)
