"""Text <-> token ids through Hugging Face `tokenizers`, plus the model's chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from kvserve.json_object import read_json_object
from kvserve.token_bound import TokenBound, bytes_to_unicode, token_bound

# llama.cpp "tokenizer.ggml.pre" names whose split regex differs from GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class Tokenizer:
    hf: HFTokenizer
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it throughout), so a
        # long text stalls neither the event loop nor the step thread.
        return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def bound(self) -> TokenBound | None:
        """How few tokens a text can encode to (token_bound.py); None when unproven."""
        return token_bound(self.hf)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), found without tokenizing (0: no bound)."""
        return self.bound.fewest_tokens(text) if self.bound is not None else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render the conversation with the model's own template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("messages: this model has no chat template")
        _check_messages(messages)
        from jinja2.exceptions import TemplateError

        template = self._chat_template  # a template that does not compile is the server's fault
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as exc:  # raise_exception(...) in the template: the caller's input
            raise ValueError(f"messages: {exc.message or type(exc).__name__}") from None

    @cached_property
    def _chat_template(self) -> Any:
        return _jinja_env().from_string(self.chat_template)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path, eos_from_model: list[int]) -> Tokenizer:
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: tokenizer file not found")
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # noqa: BLE001 -- tokenizers raises bare Exception
            raise ValueError(f"{tok_file}: cannot parse tokenizer: {exc}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        bos = _token_text(cfg.get("bos_token"))
        eos = _token_text(cfg.get("eos_token"))
        eos_ids = list(eos_from_model)
        for extra in _ids(gen.get("eos_token_id")):
            if extra not in eos_ids:
                eos_ids.append(extra)
        if eos is not None and (eid := hf.token_to_id(eos)) is not None and eid not in eos_ids:
            eos_ids.append(eid)
        template = cfg.get("chat_template")
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if cfg.get("add_bos_token") and bos is not None:
            _ensure_bos(hf, bos)
        return cls(hf, eos_ids, bos, eos, template)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"{source}: GGUF tokenizer type {kind!r} is not supported "
                             "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
        try:
            tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
            if kind == "gpt2":
                hf = _byte_level_bpe(tokens, list(meta["tokenizer.ggml.merges"]),
                                     meta.get("tokenizer.ggml.pre", ""))
            else:
                hf = _sentencepiece_bpe(tokens, list(meta["tokenizer.ggml.scores"]))
        except KeyError as exc:
            raise ValueError(f"{source}: GGUF metadata lacks {exc.args[0]!r}") from None
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        byte_chars = set(bytes_to_unicode().values())
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types)
                   if ty == _CONTROL and (kind != "gpt2" or set(t) <= byte_chars)]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        hf.add_special_tokens(control)
        hf.add_tokens(user)

        def tok(key: str) -> str | None:
            idx = meta.get(key)
            return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

        bos, eos = tok("tokenizer.ggml.bos_token_id"), tok("tokenizer.ggml.eos_token_id")
        eos_ids = [int(meta["tokenizer.ggml.eos_token_id"])] if eos is not None else []
        # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
        add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
        if add_bos and bos is not None:
            _ensure_bos(hf, bos)
        return cls(hf, eos_ids, bos, eos, meta.get("tokenizer.chat_template"))


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str) -> HFTokenizer:
    """GPT-2 style: tokens spelled in the byte alphabet, merges given by the file."""
    spell = bytes_to_unicode()
    byte_chars = set(spell.values())
    vocab = {(t if set(t) <= byte_chars else "".join(spell[b] for b in t.encode())): i
             for i, t in enumerate(tokens)}
    pairs = [(left, right) for left, right in (m.split(" ", 1) for m in merges)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    split = _GGUF_SPLITS.get(pre)
    if split is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _sentencepiece_bpe(tokens: list[str], scores: list[float]) -> HFTokenizer:
    """Llama 2 / TinyLlama / Mistral style: "▁" for spaces, <0xNN> byte fallback, and
    merges recovered from the scores (every split of a token into two vocabulary pieces,
    best-scored first), as transformers does for these files."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in found],
                                fuse_unk=True, byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return hf


def _ensure_bos(hf: HFTokenizer, bos: str) -> None:
    """Make encode() prepend BOS when the tokenizer's own post-processor does not."""
    probe = hf.encode("a", add_special_tokens=True).ids
    bos_id = hf.token_to_id(bos)
    if bos_id is None or (probe and probe[0] == bos_id):
        return
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def _check_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}]: must be a dict with 'role' and 'content'")


def _jinja_env() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
