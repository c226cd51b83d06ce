"""Structured outputs: spec validation, the xgrammar compile cache, the sampler's token mask
against the grammar engine's own accept check, and LLM.generate outputs that parse and
validate (jsonschema) over many schemas and seeds on a tiny random model with the embedded
SmolLM2 tokenizer's real vocabulary."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve import LLM, SamplingParams, StructuredOutput
from kvserve.grammar import GrammarCompiler
from kvserve.grammar_mask import apply_grammar_mask
from kvserve.model.loader import load_checkpoint
from kvserve.sampling import Sampler
from kvserve.tokenizer import Tokenizer

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"type": "integer", "enum": [1, 2, 3]}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {
        "user": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                     "maxItems": 3}},
            "required": ["id", "tags"], "additionalProperties": False},
        "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1},
                                      "y": {"type": "number", "exclusiveMinimum": -10,
                                            "maximum": 10}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                      "note": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["code", "note"], "additionalProperties": False},
    {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"k": {"const": "v"}, "n": {"type": "integer",
                                                                    "minimum": 0, "maximum": 9}},
        "required": ["k", "n"], "additionalProperties": False}},
    {"anyOf": [{"type": "integer", "minimum": 10, "maximum": 99},
               {"type": "string", "enum": ["none", "some"]}]},
    {"type": "object", "properties": {"$defs_ref": {"$ref": "#/$defs/point"}},
     "required": ["$defs_ref"], "additionalProperties": False,
     "$defs": {"point": {"type": "object", "properties": {
         "a": {"type": "integer", "minimum": 0, "maximum": 3},
         "b": {"type": "boolean"}}, "required": ["a", "b"], "additionalProperties": False}}},
]
PROMPTS = ["Answer in JSON:", "hello", "The quick brown fox", "{"]


@pytest.fixture(scope="module")
def llm(tiny_smollm2_vocab_dir: Path) -> Any:
    with LLM(str(tiny_smollm2_vocab_dir), device="cpu", kv_cache_memory="16MiB",
             max_model_len=512, max_num_seqs=64, seed=3) as engine:
        yield engine


@pytest.fixture(scope="module")
def tokenizer(tiny_smollm2_vocab_dir: Path) -> Tokenizer:
    return load_checkpoint(str(tiny_smollm2_vocab_dir)).tokenizer


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, max_entries=4)


# ---- the spec -----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "SamplingParams.structured: set exactly one"),
    ({"regex": "a", "grammar": 'root ::= "a"'}, "SamplingParams.structured: set exactly one"),
    ({"json_schema": "{not json"}, "SamplingParams.structured.json_schema: not valid JSON"),
    ({"json_schema": "[1, 2]"}, "SamplingParams.structured.json_schema: must be a JSON schema"),
    ({"json_schema": {"type": "strnig"}},
     "SamplingParams.structured.json_schema: not a valid JSON schema"),
    ({"json_schema": {"type": "object", "properties": {"a": {"minimum": "zero"}}}},
     "SamplingParams.structured.json_schema: not a valid JSON schema at properties/a/minimum"),
    ({"json_schema": {"type": "string", "pattern": "(("}},
     "SamplingParams.structured.json_schema: not a valid JSON schema at pattern"),
    ({"regex": ""}, "SamplingParams.structured.regex: must be a non-empty string"),
    ({"grammar": 3}, "SamplingParams.structured.grammar: must be a non-empty string"),
    ({"json_object": "yes"}, "SamplingParams.structured.json_object: must be a bool"),
])
def test_bad_spec_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        StructuredOutput(**kwargs)


def test_spec_on_sampling_params() -> None:
    spec = StructuredOutput(json_schema='{"type": "integer"}')
    assert spec.kind == "json_schema"
    assert spec.cache_key() == StructuredOutput(json_schema={"type": "integer"}).cache_key()
    assert StructuredOutput(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match=r"^SamplingParams\.structured must be"):
        SamplingParams(structured={"regex": "a"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^SamplingParams\.min_tokens must be 0 with structured"):
        SamplingParams(min_tokens=2, structured=spec)
    # A structured row is never "plain greedy": the decode graphs' argmax and run-ahead would
    # bypass the mask.
    row = type("Row", (), {"params": SamplingParams(temperature=0, structured=spec)})()
    assert not Sampler.greedy_only([row])


# ---- compiling and caching ----------------------------------------------------------------

@pytest.mark.parametrize(("spec", "field"), [
    (StructuredOutput(regex="a(("), "SamplingParams.structured.regex: cannot be compiled"),
    (StructuredOutput(grammar="root ::= undefined_rule"),
     "SamplingParams.structured.grammar: cannot be compiled"),
    (StructuredOutput(json_schema={"type": "integer", "minimum": 5, "maximum": 1}),
     "SamplingParams.structured.json_schema: cannot be compiled: Invalid range"),
    (StructuredOutput(json_schema={"type": "string", "pattern": "(?<=a)b"}),
     "SamplingParams.structured.json_schema: cannot be compiled"),
    (StructuredOutput(json_schema={"$ref": "#/$defs/missing"}),
     "SamplingParams.structured.json_schema: cannot be compiled"),
    # xgrammar would ignore these lookaheads, so the output would not match: refused
    (StructuredOutput(json_schema={"type": "object", "properties": {
        "a": {"type": "string", "pattern": "^(?!x)[a-z]+$"}}}),
     "SamplingParams.structured.json_schema: cannot be compiled: lookaround"),
    (StructuredOutput(regex="a(?=b)b"),
     "SamplingParams.structured.regex: cannot be compiled: lookaround"),
])
def test_uncompilable_spec_names_the_field(compiler: GrammarCompiler, spec: StructuredOutput,
                                           field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field)) as info:
        compiler.compile(spec)
    assert "/project/" not in str(info.value) and ".cc:" not in str(info.value)


def test_compiled_grammars_are_cached_lru(compiler: GrammarCompiler) -> None:
    specs = [StructuredOutput(regex=f"[a-z]{{{n}}}") for n in range(1, 7)]
    hits, misses = compiler.hits, compiler.misses
    first = compiler.compile(specs[0])
    assert compiler.compile(StructuredOutput(regex="[a-z]{1}")) is first
    assert (compiler.hits - hits, compiler.misses - misses) == (1, 1)
    for spec in specs[1:]:
        compiler.compile(spec)
    assert len(compiler) == compiler.max_entries == 4
    compiler.compile(specs[-1])  # still cached
    assert compiler.compile(specs[0]) is not first  # evicted, compiled again
    assert compiler.misses - misses == len(specs) + 1


# ---- the mask against the engine's own accept check ---------------------------------------

def _random_walk(matcher: Any, compiler: GrammarCompiler, steps: int, rng: random.Random) -> None:
    """Advance `matcher` by up to `steps` tokens, each drawn among those its mask allows."""
    vocab = compiler.vocab_size
    for _ in range(steps):
        logits = torch.zeros(1, vocab)
        apply_grammar_mask(logits, [_Row(matcher)])
        allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
        if matcher.is_completed():
            break
        token = rng.choice([t for t in allowed if t not in matcher.stop_token_ids] or allowed)
        assert matcher.accept_token(token)


class _Row:
    def __init__(self, grammar: Any) -> None:
        self.grammar = grammar


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_exactly_what_the_grammar_accepts(compiler: GrammarCompiler, device: str) -> None:
    rng = random.Random(0)
    specs = [StructuredOutput(json_schema=SCHEMAS[i]) for i in (0, 3, 5)] + [
        StructuredOutput(regex=r"(ab|[0-9]{2,4})+x"),
        StructuredOutput(grammar='root ::= "(" item ("," item)* ")"\nitem ::= [0-9]+ | "nil"'),
    ]
    rows: list[_Row] = []
    for spec in specs:
        matcher = compiler.matcher(spec)
        _random_walk(matcher, compiler, rng.randrange(0, 12), rng)
        rows.append(_Row(matcher))
    rows.insert(2, _Row(None))  # an unconstrained row in the batch stays untouched
    vocab = compiler.vocab_size
    logits = torch.randn(len(rows), vocab, device=device)
    before = logits.clone()
    apply_grammar_mask(logits, rows)
    logits = logits.cpu()
    assert torch.equal(logits[2], before[2].cpu())
    for i, row in enumerate(rows):
        if row.grammar is None:
            continue
        kept = torch.isfinite(logits[i])
        assert torch.equal(logits[i][kept], before[i].cpu()[kept])  # allowed logits unchanged
        accepted = torch.zeros(vocab, dtype=torch.bool)
        for token in range(vocab):
            probe = row.grammar.fork()
            accepted[token] = probe.accept_token(token)
        assert torch.equal(kept, accepted), (i, specs[min(i, len(specs) - 1)])


# ---- end to end through LLM.generate ------------------------------------------------------

def _check_blocks_back(llm: Any) -> None:
    core = llm.engine.core
    core.check_invariants()
    assert not llm.engine.has_unfinished()
    assert core.num_used_gpu_blocks == 0


def test_json_schema_outputs_validate_over_schemas_and_seeds(llm: Any) -> None:
    params, schemas = [], []
    for seed in range(2):
        for k, schema in enumerate(SCHEMAS):
            text_form = json.dumps(schema) if (seed + k) % 2 else schema
            params.append(SamplingParams(
                temperature=[1.0, 0.8, 1.3][seed], top_p=[1.0, 0.95, 1.0][seed],
                top_k=[0, 0, 50][seed], seed=1000 * seed + k, max_tokens=160,
                structured=StructuredOutput(json_schema=text_form)))
            schemas.append(schema)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    outs = llm.generate(prompts, params)
    for out, schema in zip(outs, schemas):
        assert out.finish_reason == "stop", (out.text, schema)
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in outs}) > len(SCHEMAS)  # the seeds really sample
    _check_blocks_back(llm)


def _leaf_schemas() -> st.SearchStrategy[dict[str, Any]]:
    bounded_int = st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]})
    bounded_num = st.tuples(st.integers(-5, 5), st.integers(1, 9)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]})
    short_str = st.integers(0, 8).map(lambda n: {"type": "string", "maxLength": n})
    pattern_str = st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(on|off)$"]).map(
        lambda p: {"type": "string", "pattern": p})
    enum = st.lists(st.sampled_from(["a", "bc", 1, 2.5, True, None]), min_size=1, max_size=4,
                    unique=True).map(lambda v: {"enum": v})
    return st.one_of(bounded_int, bounded_num, short_str, pattern_str, enum,
                     st.just({"type": "boolean"}), st.just({"type": "null"}))


def _schemas() -> st.SearchStrategy[dict[str, Any]]:
    def containers(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
        props = st.dictionaries(st.sampled_from(["id", "name", "v", "items", "ok", "x"]), inner,
                                min_size=1, max_size=4)
        obj = st.tuples(props, st.integers(0, 4)).map(
            lambda t: {"type": "object", "properties": t[0], "additionalProperties": False,
                       "required": sorted(t[0])[: t[1]]})
        arr = st.tuples(inner, st.integers(0, 2), st.integers(0, 3)).map(
            lambda t: {"type": "array", "items": t[0], "minItems": t[1],
                       "maxItems": t[1] + t[2]})
        return st.one_of(obj, arr)

    return st.recursive(_leaf_schemas(), containers, max_leaves=6)


@settings(max_examples=3, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schemas=st.lists(_schemas(), min_size=6, max_size=6), seed=st.integers(0, 2**31))
def test_generated_schemas_validate(llm: Any, schemas: list[dict[str, Any]], seed: int) -> None:
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=200,
                             structured=StructuredOutput(json_schema=schema))
              for i, schema in enumerate(schemas)]
    for out, schema in zip(llm.generate(["Answer in JSON:"] * len(schemas), params), schemas):
        assert out.finish_reason == "stop", (out.text, schema)
        jsonschema.validate(json.loads(out.text), schema)


def test_seeded_structured_output_is_reproducible(llm: Any) -> None:
    spec = StructuredOutput(json_schema=SCHEMAS[3])
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=200, structured=spec)
    alone = llm.generate(["hello"], params)[0]
    noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(["hello", "noise", "more noise"], [params, noise, noise])[0]
    assert mixed.token_ids == alone.token_ids


def test_regex_and_grammar_outputs_match(llm: Any) -> None:
    regex = r"[a-z]{2,5}-[0-9]{2}(\.[0-9])?"
    grammar = ('root ::= "(" item ("," item)* ")"\n'
               'item ::= [0-9] [0-9]? | "nil" | "(" item ")"')
    specs = [StructuredOutput(regex=regex), StructuredOutput(grammar=grammar)]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=120, structured=spec)
              for s in range(3) for spec in specs]
    outs = llm.generate(["hello"] * len(params), params)
    for i, out in enumerate(outs):
        assert out.finish_reason == "stop", out.text
        assert (re.fullmatch(regex, out.text) if i % 2 == 0
                else _is_item_list(out.text)), out.text
    _check_blocks_back(llm)


def _is_item_list(text: str) -> bool:
    """Reference parser for the grammar above (recursive descent)."""
    def item(i: int) -> int:  # index after one item, or -1
        if m := re.match(r"[0-9][0-9]?|nil", text[i:]):
            return i + m.end()
        if text.startswith("(", i) and (j := item(i + 1)) >= 0 and text.startswith(")", j):
            return j + 1
        return -1

    if not text.startswith("("):
        return False
    i = item(1)
    while i >= 0 and text.startswith(",", i):
        i = item(i + 1)
    return i >= 0 and text[i:] == ")"


def test_json_object_output(llm: Any) -> None:
    """Any object: a random model may write one long string key, so a cut-off output is
    allowed; one that ended must parse as an object."""
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=24,
                             structured=StructuredOutput(json_object=True)) for s in range(2)]
    for out in llm.generate(["hello"] * len(params), params):
        assert out.text.startswith("{"), out.text
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict), out.text
    _check_blocks_back(llm)


def test_greedy_structured_beside_plain_greedy(llm: Any) -> None:
    """Greedy with a spec is masked; a plain greedy row in the same batch is unchanged."""
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    spec = StructuredOutput(json_schema=SCHEMAS[2])
    ref = llm.generate(["The quick brown fox"], plain)[0]
    outs = llm.generate(["The quick brown fox", "hello"],
                        [plain, SamplingParams(temperature=0, max_tokens=100, structured=spec)])
    assert outs[0].token_ids == ref.token_ids
    assert outs[1].finish_reason == "stop"
    jsonschema.validate(json.loads(outs[1].text), SCHEMAS[2])


def test_ignore_eos_still_ends_when_the_grammar_ends(llm: Any) -> None:
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=100, ignore_eos=True,
                            structured=StructuredOutput(regex="(yes|no)"))
    out = llm.generate(["hello"], params)[0]
    assert out.finish_reason == "stop"
    assert out.text in ("yes", "no")
    _check_blocks_back(llm)


def test_uncompilable_schema_through_generate_queues_nothing(llm: Any) -> None:
    bad = SamplingParams(structured=StructuredOutput(
        json_schema={"type": "string", "minLength": 5, "maxLength": 2}))
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=r"^SamplingParams\.structured\.json_schema: cannot be"):
        llm.generate(["hello", "hello"], [good, bad])
    _check_blocks_back(llm)
    assert llm.engine.core.num_waiting == 0
    assert len(llm.generate(["hello"], good)[0].token_ids) == 4  # still serving


def test_structured_cache_shared_across_requests(llm: Any) -> None:
    grammars = llm.engine.grammars
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS[1]))
    misses = grammars.misses
    outs = llm.generate(["a", "b", "c"], SamplingParams(temperature=1.0, max_tokens=60,
                                                         structured=spec))
    assert grammars.misses - misses <= 1
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMAS[1])
    assert np.all([o.finish_reason == "stop" for o in outs])
