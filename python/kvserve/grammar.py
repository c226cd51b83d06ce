"""Structured outputs compiled by xgrammar for one tokenizer; compiled grammars kept in an LRU.

xgrammar was chosen over llguidance by measuring the per-step bitmask fill on the SmolLM2
vocabulary (benches/bench_grammar_engines.py, benches/RESULTS.md).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import xgrammar as xgr

from kvserve.structured_output import FIELD, StructuredOutput
from kvserve.tokenizer import Tokenizer

DEFAULT_CACHE_ENTRIES = 256
# xgrammar prefixes its messages with "[hh:mm:ss] /path/file.cc:123: "; the rest is the reason.
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
# xgrammar ignores lookahead (with a warning) instead of enforcing it, so it is refused here.
_LOOKAROUND = re.compile(r"(?<!\\)\(\?<?[=!]")


class GrammarCompiler:
    """Compiles StructuredOutput specs to xgrammar grammars and hands out matchers.

    Thread-safe: add_request may run on several threads (the server's event loop, LLM users).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        from transformers import PreTrainedTokenizerFast

        # vocab_size: the logits' width, which may exceed the tokenizer's (padded rows are
        # never allowed).
        info = xgr.TokenizerInfo.from_huggingface(
            PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf), vocab_size=vocab_size,
            stop_token_ids=tokenizer.eos_token_ids)
        # Our LRU is the one cache (keyed by the spec), so xgrammar's own is off.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """Raises ValueError naming SamplingParams.structured.<field> when it cannot compile."""
        key = spec.cache_key()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return found
        compiled = self._compile(spec)
        with self._lock:
            self.misses += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(self.compile(spec))

    def __len__(self) -> int:
        return len(self._cache)

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        kind = spec.kind
        patterns = ([str(spec.regex)] if kind == "regex" else
                    _schema_patterns(json.loads(spec.schema_text())) if kind == "json_schema"
                    else [])
        for pattern in patterns:
            if _LOOKAROUND.search(pattern):
                raise ValueError(f"{FIELD}.{kind}: cannot be compiled: lookaround assertions "
                                 f"are not supported: {pattern!r}")
        try:
            if kind == "json_schema":
                # Compact JSON (no free whitespace): a model cannot stall in endless blanks.
                return self._compiler.compile_json_schema(spec.schema_text(),
                                                          any_whitespace=False)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}',
                                                          any_whitespace=False)
            if kind == "regex":
                return self._compiler.compile_regex(str(spec.regex))
            return self._compiler.compile_grammar(str(spec.grammar))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"{FIELD}.{kind}: cannot be compiled: {_reason(exc)}") from None


def _schema_patterns(node: Any) -> list[str]:
    """Every regular expression in a schema: "pattern" values and "patternProperties" keys."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                found.append(value)
            elif key == "patternProperties" and isinstance(value, dict):
                found.extend(value)
            found.extend(_schema_patterns(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_schema_patterns(value))
    return found


def _reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _NATIVE_PREFIX.sub("", first)
