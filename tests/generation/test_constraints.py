"""Constrained decoding on random-weight models (which write garbage unless constrained): JSON schemas, choices and
regexes sampled at temperature 1.0, checked by independent validators (jsonschema, Python's re)."""

import json
import re

import jsonschema
import pytest
import torch

from smolvlm.errors import InputError
from smolvlm.generation import SamplingParams
from smolvlm.generation.constraints import Grammar

SCHEMAS = [
    {  # nested objects, a pattern string, an enum
        "type": "object",
        "properties": {
            "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                       "required": ["name", "age"], "additionalProperties": False},
            "address": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lima", "Oslo"]},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["person", "address"], "additionalProperties": False,
    },
    {  # an array with min/max items of objects, a bounded number
        "type": "object",
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
                "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False}},
            "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25},
        },
        "required": ["items", "total"], "additionalProperties": False,
    },
    {  # enums, an array of enums with bounds, a number in [0, 1]
        "type": "object",
        "properties": {
            "label": {"enum": ["cat", "dog", "bird"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.125},
            "tags": {"type": "array", "items": {"enum": ["indoor", "outdoor", "blurry"]}, "minItems": 0,
                     "maxItems": 3},
        },
        "required": ["label", "confidence", "tags"], "additionalProperties": False,
    },
    {  # bounded numbers and integers, negative ranges, exclusive bounds
        "type": "object",
        "properties": {
            "x": {"type": "number", "exclusiveMinimum": -5, "maximum": 5, "multipleOf": 0.5},
            "y": {"type": "integer", "minimum": -3, "maximum": 3},
            "z": {"type": "integer", "minimum": 100, "exclusiveMaximum": 200},
            "ok": {"type": "boolean"},
        },
        "required": ["x", "y", "z", "ok"], "additionalProperties": False,
    },
    {  # required and optional fields, a nullable one
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 20},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "genre": {"enum": ["drama", "comedy", None]},
            "code": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
        },
        "required": ["title"], "additionalProperties": False,
    },
]
PER_SCHEMA = 40  # 5 x 40 = 200 answers
# Numbers have a multipleOf: a fraction may have any number of digits, and a random model keeps adding them.


@pytest.fixture(scope="module")
def conversation(v2):
    return lambda i: v2.prompt(f"Fill in the record number {i}, as JSON.")


@pytest.fixture(scope="module")
def engine(v2):
    return v2.engine(max_batch=40, max_len=256)


def test_200_sampled_answers_over_5_schemas_all_validate(engine, conversation):
    params = [SamplingParams(max_new_tokens=160, temperature=1.0, seed=1000 * s + i,
                             grammar=Grammar.json_schema(schema))
              for s, schema in enumerate(SCHEMAS) for i in range(PER_SCHEMA)]  # fmt: skip
    results = engine.generate([conversation(i) for i in range(len(params))], params)
    assert len(results) == 200
    for p, r in zip(params, results):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), p.grammar.schema)
    assert len({r.text for r in results}) > 150  # sampled, not one answer repeated
    # optional fields are sometimes there and sometimes not
    last = [json.loads(r.text) for r in results[-PER_SCHEMA:]]
    assert any("year" in a for a in last) and any("year" not in a for a in last)


def test_choices_always_one_of_them(engine, conversation):
    choices = ["yes", "no", 'maybe "so"', "line\nbreak", "café ☕", "yes sir"]
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, seed=i, grammar=Grammar.choice(choices))
              for i in range(40)]
    results = engine.generate([conversation(i) for i in range(40)], params)
    assert all(r.text in choices and r.finish_reason == "stop" for r in results), [r.text for r in results]
    assert len({r.text for r in results}) >= 4


def test_regex_always_matches(engine, conversation):
    pattern = r"[0-9]{3}-[a-z]{2,5}( [A-Z][a-z]{1,6})?"
    params = [SamplingParams(max_new_tokens=30, temperature=1.0, seed=i, grammar=Grammar.regex(pattern))
              for i in range(40)]
    results = engine.generate([conversation(i) for i in range(40)], params)
    for r in results:
        assert r.finish_reason == "stop" and re.fullmatch(pattern, r.text), r.text
    assert len({r.text for r in results}) > 30


def test_completed_grammar_ends_the_answer_without_an_end_token(v2, engine, conversation):
    (r,) = engine.generate([conversation(0)], SamplingParams(grammar=Grammar.choice(["a long answer"])))
    assert r.text == "a long answer" and r.finish_reason == "stop"
    assert not set(r.token_ids) & set(v2.end_ids)


def test_unconstrained_rows_in_a_mixed_batch_keep_their_output(engine, conversation):
    free = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=1.0, seed=7),
            SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=8, repetition_penalty=1.3)]
    alone = engine.generate([conversation(i) for i in range(3)], free)
    constrained = [SamplingParams(max_new_tokens=40, temperature=1.0, seed=i, grammar=Grammar.json_schema(s))
                   for i, s in enumerate(SCHEMAS[:3])]
    mixed = engine.generate([conversation(i) for i in [0, 10, 1, 11, 2, 12]],
                            [free[0], constrained[0], free[1], constrained[1], free[2], constrained[2]])
    assert [r.token_ids for r in mixed[::2]] == [r.token_ids for r in alone]
    assert all(json.loads(r.text) for r in mixed[1::2] if r.finish_reason == "stop")


def test_greedy_constrained_answer_is_batch_invariant(engine, conversation):
    params = SamplingParams(max_new_tokens=80, grammar=Grammar.json_schema(SCHEMAS[2]))
    (alone,) = engine.generate([conversation(5)], params)
    batch = engine.generate([conversation(i) for i in range(6)], [SamplingParams(max_new_tokens=30)] * 5 + [params])
    assert batch[-1].token_ids == alone.token_ids
    jsonschema.validate(json.loads(alone.text), SCHEMAS[2])


def test_max_tokens_cut_gives_length_and_a_valid_prefix(engine, conversation):
    choices = ["supercalifragilistic expialidocious", "antidisestablishmentarianism forever"]
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=i, grammar=Grammar.choice(choices))
              for i in range(8)]
    for r in engine.generate([conversation(i) for i in range(8)], params):
        assert r.finish_reason == "length" and len(r.token_ids) == 3
        assert any(c.startswith(r.text) and c != r.text for c in choices), r.text
    schema_params = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i, grammar=Grammar.json_schema(SCHEMAS[0]))
                     for i in range(8)]
    for r in engine.generate([conversation(i) for i in range(8)], schema_params):
        assert r.finish_reason == "length"
        head = '{"person": {"name": "'  # the schema's first property, its first field
        assert r.text.startswith(head) or head.startswith(r.text), r.text
        fresh = engine.grammars.matcher(Grammar.json_schema(SCHEMAS[0])).matcher
        assert fresh.validate_tokens(r.token_ids) == len(r.token_ids)  # every token a step of a valid answer


def test_stop_strings_still_cut_a_constrained_answer(engine, conversation):
    params = [SamplingParams(max_new_tokens=120, temperature=1.0, seed=i, stop=(", ",),
                             grammar=Grammar.json_schema(SCHEMAS[3])) for i in range(6)]
    for r in engine.generate([conversation(i) for i in range(6)], params):
        assert r.finish_reason == "stop" and r.text.startswith('{"x": ') and ", " not in r.text


@pytest.mark.parametrize("grammar, problem", [
    (lambda: Grammar.json_schema({"type": "wat"}), "wat"),
    (lambda: Grammar.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "missing"),
    (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "Unimplemented keys: [\"uniqueItems\"]"),
    (lambda: Grammar.regex("a[b"), "unclosed character class"),
])  # fmt: skip
def test_uncompilable_grammars_are_refused_before_anything_is_queued(engine, grammar, problem, conversation):
    with pytest.raises(InputError, match="Can't compile the") as e:
        engine.add_request(conversation(0), SamplingParams(grammar=grammar()))
    assert problem in str(e.value)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("make, arg", [
    (Grammar.json_schema, "{not json"), (Grammar.json_schema, [1, 2]), (Grammar.regex, ""),
    (Grammar.choice, []), (Grammar.choice, "yes"), (Grammar.choice, ["ok", 3]),
])  # fmt: skip
def test_malformed_constraints_name_the_problem(make, arg):
    with pytest.raises(InputError, match="JSON|regex|choices"):
        make(arg)


def test_mask_forbids_rows_past_the_tokenizer_and_leaves_free_rows_alone(engine):
    grammars = engine.grammars
    extra = 100  # an lm_head larger than the tokenizer's vocabulary
    logits = torch.randn(3, grammars.vocab + extra)
    matcher = grammars.matcher(Grammar.choice(["yes", "no"]))
    masked = grammars.mask(logits.clone(), [None, matcher, None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    allowed = masked[1].isfinite().nonzero().flatten().tolist()
    assert 0 < len(allowed) < 20 and max(allowed) < grammars.vocab
    assert torch.equal(masked[1, allowed], logits[1, allowed])
