"""The JSON Schema to GBNF converter: what it refuses, what llama.cpp's grammar machinery accepts,
and that what the real model writes under it at a high temperature always validates."""

from __future__ import annotations

import ctypes
import json
import re
from datetime import datetime, time

import pytest

from infer_cli import engine
from infer_cli.engine.json_schema import JSON_OBJECT_GBNF, UnsupportedSchema, to_gbnf
from infer_cli.engine.sampling import Sampler, Sampling

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    model = engine.Model(smollm2_gguf, engine.Options())
    yield model
    model.close()


def _checker():
    # jsonschema checks date and uuid itself; time and date-time need an optional package, so
    # they are checked here with datetime.
    fc = jsonschema.FormatChecker()

    @fc.checks("date-time", raises=ValueError)
    def _dt(s):
        return not isinstance(s, str) or bool(
            re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", s)
            and datetime.fromisoformat(s))

    @fc.checks("time", raises=ValueError)
    def _t(s):
        return not isinstance(s, str) or bool(
            re.fullmatch(r"\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", s) and time.fromisoformat(s))

    return fc


def validate(instance, schema):
    cls = jsonschema.validators.validator_for(schema)
    cls(schema, format_checker=_checker()).validate(instance)


# --- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("schema, message", [
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 5}}},
     "$.properties.age: 'multipleOf' is not supported"),
    ({"type": "string", "pattern": "[a-z]+"}, "$: 'pattern' must be anchored"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "$: 'pattern' escape \\1"),
    ({"type": "string", "pattern": "^(?=a)a$"}, "$: 'pattern' lookarounds"),
    ({"type": "string", "pattern": "^(ab)*$", "maxLength": 4}, "$: 'pattern' together with"),
    ({"type": "string", "format": "email"}, "$: 'format' 'email' is not supported"),
    ({"type": "array", "uniqueItems": True}, "$: 'uniqueItems' is not supported"),
    ({"type": "object", "minProperties": 1}, "$: 'minProperties'"),
    ({"type": "number", "minimum": 0.5}, "$: 'minimum' with a fraction"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "$.oneOf: 'oneOf' branches 0 and 1"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "'oneOf' branches"),
    ({"$ref": "https://example.com/s"}, "$: '$ref' 'https://example.com/s' is not supported"),
    ({"$ref": "#/$defs/nope"}, "points at nothing"),
    ({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"},
     "recurses without consuming input"),
    ({"type": "array", "items": [{"type": "string"}]}, "$: 'items' as an array"),
    ({"properties": {"x": {"patternProperties": {}}}}, "$.properties.x: 'patternProperties'"),
    ({"type": "object", "properties": {"a b": {"if": {}}}}, '$.properties["a b"]: \'if\''),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "different types"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "leave no integer"),
    ({"enum": [1, "a"], "type": "boolean"}, "'enum' leaves no value"),
    (False, "accepts no value"),
])
def test_refusals_name_the_keyword_and_path(schema, message):
    with pytest.raises(UnsupportedSchema) as e:
        to_gbnf(schema)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError) and str(e.value).startswith(e.value.path + ": ")


def test_annotations_are_ignored():
    to_gbnf({"title": "t", "description": "d", "examples": [1], "default": 2, "$comment": "c",
             "$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:x",
             "deprecated": False, "readOnly": True, "writeOnly": False, "type": "integer"})


# --- llama.cpp reads the grammars, and accepts exactly the right texts -----------------------

def accepts(model, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets ``text`` through and then lets it end: each
    token is offered alone to the grammar, which sets its logit to -inf if it is not allowed."""
    L = model.L
    smpl = L.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    assert smpl, "llama.cpp could not parse the grammar"
    one = (L.llama_token_data * 1)()
    arr = L.llama_token_data_array(one, 1, -1, False)

    def allowed(tok: int) -> bool:
        one[0].id, one[0].logit, one[0].p = tok, 0.0, 0.0
        arr.size, arr.selected = 1, -1
        L.llama_sampler_apply(smpl, ctypes.byref(arr))
        return one[0].logit != float("-inf")

    try:
        for tok in model.tokenize(text, add_special=False, parse_special=False):
            if not allowed(tok):
                return False
            L.llama_sampler_accept(smpl, tok)
        return allowed(L.llama_vocab_eos(model.vocab))
    finally:
        L.llama_sampler_free(smpl)


GRAMMAR_CASES = [
    ({"type": "integer", "minimum": -37, "maximum": 1250},
     ["-37", "-1", "0", "7", "10", "999", "1000", "1199", "1250"],
     ["-38", "-0", "01", "1251", "2000", "-100", "1.0", "12345"]),
    ({"type": "integer", "exclusiveMinimum": 9, "exclusiveMaximum": 100},
     ["10", "55", "99"], ["9", "100", "0", "-5"]),
    ({"type": "integer", "minimum": -500, "maximum": -20},
     ["-500", "-20", "-99", "-100", "-21"], ["-19", "-501", "-1000", "20", "0"]),
    ({"type": "integer", "minimum": 95}, ["95", "99", "100", "123456789"], ["94", "9", "-1"]),
    ({"type": "integer", "maximum": -3}, ["-3", "-40", "-123456"], ["-2", "0", "3"]),
    ({"type": "number", "minimum": 0, "exclusiveMaximum": 10},
     ["0", "0.5", "9.999", "3"], ["10", "10.0", "-1", "-0.5", "1e3"]),
    ({"type": "number", "exclusiveMinimum": -2, "maximum": 3},
     ["-1.5", "-1.99", "0", "3", "3.00", "-0.25"], ["-2", "-2.0", "3.01", "4", "-3"]),
    ({"type": "string", "maxLength": 3},
     ['""', '"abc"', '"\\n\\u00e9x"', '"é€😀"'], ['"abcd"', '"a\nb"', '"\\ud83d\\ude00"', '"\\x"']),
    ({"type": "string", "pattern": "^[A-Z]{2}-\\d{3,5}$"},
     ['"AB-123"', '"ZZ-12345"'], ['"Ab-123"', '"AB-12"', '"AB-123456"', '"AB_123"']),
    ({"type": "string", "pattern": '^(a|b"c)[^x]\\\\$'},
     ['"ay\\\\"', '"b\\"cz\\\\"'], ['"ax\\\\"', '"a\\u0079\\\\"']),
    ({"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 4},
     ['"ab"', '"abcd"'], ['"a"', '"abcde"']),
    ({"type": "string", "format": "date"},
     ['"2024-02-29"', '"2000-02-29"', '"1999-12-31"'],
     ['"2023-02-29"', '"1900-02-29"', '"2024-04-31"', '"0000-01-01"', '"2024-13-01"']),
    ({"type": "string", "format": "date-time"},
     ['"2024-05-06T07:08:09Z"', '"2024-05-06T23:59:59.123+05:30"'],
     ['"2024-05-06 07:08:09Z"', '"2024-05-06T24:00:00Z"', '"2024-05-06T07:08:09"']),
    ({"type": "string", "format": "uuid"},
     ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567e89b12d3a456426614174000"']),
    ({"enum": ["red", 3, None, {"a": [1]}]}, ['"red"', "3", "null", '{"a":[1]}'], ['"blue"', "4"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                       "c": {"type": "boolean"}}, "required": ["b"]},
     ['{"b": ""}', '{"a": 1, "b": "x"}', '{"b":"x","c":true}', '{\n  "a": 1,\n  "b": "x",\n  "c": false\n}'],
     ['{}', '{"a": 1}', '{"b": "x", "a": 1}', '{"b": "x", "d": 1}', '{"b": "x",}',
      '{"b":' + " " * 30 + '"x"}']),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     ["[1, 2]", "[1,2,3]"], ["[]", "[1]", "[1,2,3,4]", '[1,"a"]']),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
     ['[]', '["a"]', '["a", 1]'], ['["a", 1, 2]', '[1]']),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]},
     ['"ab"', "null"], ['"abc"', "0"]),
    ({"oneOf": [{"type": "object", "properties": {"kind": {"const": "a"}, "x": {"type": "integer"}},
                 "required": ["kind", "x"]},
                {"type": "object", "properties": {"kind": {"const": "b"}, "y": {"type": "string"}},
                 "required": ["kind", "y"]}]},
     ['{"kind": "a", "x": 1}', '{"kind": "b", "y": ""}'], ['{"kind": "a", "y": ""}']),
    ({"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
        "required": ["v", "next"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
     ['{"v": 1, "next": {"v": 2, "next": null}}'], ['{"v": 1}', '{"v": 1, "next": {"v": 2}}']),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     ['{"a": 1, "b": "x"}'], ['{"a": 1}', '{"b": "x"}']),
]


def test_llama_cpp_accepts_the_valid_texts_and_refuses_the_others(smol):
    # A grammar with a rule llama.cpp cannot read is refused outright, so this also checks the
    # repetition syntax {m,n} that the converter relies on.
    for schema, good, bad in GRAMMAR_CASES:
        g = to_gbnf(schema)
        Sampler(smol, Sampling(grammar=g)).close()
        for text in good:
            validate(json.loads(text), schema)   # the case itself is right
            assert accepts(smol, g, text), (schema, text, g)
        for text in bad:
            assert not accepts(smol, g, text), (schema, text, g)


def test_long_runs_keep_their_bounds(smol):
    # llama.cpp reads a repetition maximum above 2000 as no maximum: longer runs must still end.
    g = to_gbnf({"type": "string", "minLength": 2500, "maxLength": 4321})
    assert accepts(smol, g, '"' + "ab" * 1250 + '"') and accepts(smol, g, '"' + "x" * 4321 + '"')
    assert not accepts(smol, g, '"' + "x" * 2499 + '"')
    assert not accepts(smol, g, '"' + "x" * 4322 + '"')
    g = to_gbnf({"type": "array", "items": {"const": 1}, "maxItems": 2345})
    assert accepts(smol, g, "[" + ",".join(["1"] * 2345) + "]")
    assert not accepts(smol, g, "[" + ",".join(["1"] * 2346) + "]")
    g = to_gbnf({"type": "string", "pattern": "^(ab{0,3}){2,2100}$"})
    assert accepts(smol, g, '"' + "abb" * 2100 + '"') and not accepts(smol, g, '"' + "ab" * 2101 + '"')


def test_json_object_grammar(smol):
    assert accepts(smol, JSON_OBJECT_GBNF, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(smol, JSON_OBJECT_GBNF, '[1]')
    assert not accepts(smol, JSON_OBJECT_GBNF, '"x"')


def test_huge_bounds_stay_small():
    g = to_gbnf({"type": "string", "maxLength": 100000})
    assert len(g) < 2000
    g = to_gbnf({"type": "integer", "minimum": -10 ** 30, "maximum": 10 ** 40 + 7})
    assert len(g) < 5000
    with pytest.raises(UnsupportedSchema):
        to_gbnf({"type": "string", "pattern": "^((a{1000}){1000}){1000}$"})


# --- the real model under the grammar ------------------------------------------------------

GEN_SCHEMAS = [
    ({"type": "integer", "minimum": -37, "maximum": 1250}, 8),
    ({"type": "integer", "exclusiveMinimum": -1000, "exclusiveMaximum": -990}, 8),
    ({"type": "number", "minimum": -5, "exclusiveMaximum": 5}, 16),
    ({"type": "string", "maxLength": 6}, 16),
    ({"type": "string", "pattern": "^[A-Z]{2}-\\d{3,5}$"}, 16),
    ({"type": "string", "format": "date"}, 16),
    ({"type": "string", "format": "date-time"}, 40),
    ({"type": "string", "format": "uuid"}, 40),
    ({"enum": ["red", "green", 7, None]}, 6),
    ({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "address": {"type": "object", "properties": {
            "zip": {"type": "string", "pattern": "^\\d{5}$"}, "city": {"type": "string", "maxLength": 8}},
            "required": ["zip"]}},
      "required": ["name", "age"]}, 90),
    ({"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4}, 32),
    ({"allOf": [{"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}},
                 "required": ["id"]},
                {"properties": {"note": {"type": "string", "maxLength": 10}}}]}, 40),
    ({"type": "object", "additionalProperties": {"type": "integer", "minimum": -9, "maximum": 9}, "maxProperties": 3,
      "minProperties": 0}, 40),
    ({"type": "array", "prefixItems": [{"type": "integer", "minimum": 1, "maximum": 9},
                                       {"type": "string", "maxLength": 3}],
      "items": False, "minItems": 2}, 16),
    ({"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}, 10),
    ({"type": ["integer", "null"], "maximum": 0}, 16),
    ({"$defs": {"tree": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/tree"}, 80),
    ({"oneOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                {"type": "string", "maxLength": 3}, {"type": "boolean"}]}, 10),
    ({"type": "object", "properties": {"when": {"type": "string", "format": "time"},
                                       "ok": {"const": True}}, "required": ["when", "ok"]}, 56),
]


def test_real_model_output_always_validates(smol):
    prompt = smol.tokenize("Here is the answer as JSON:\n")
    session = engine.Session(smol, engine.Options(n_ctx=512))
    finished = 0
    for schema, max_tokens in GEN_SCHEMAS:
        g = to_gbnf(schema)
        for seed in (1, 2, 3):
            s = Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed, grammar=g)
            events = list(engine.stream(session, engine.Request(tuple(prompt), s, max_tokens)))
            text = "".join(e.text for e in events)
            if events[-1].finish_reason != "stop":
                continue  # cut off by the token limit: an unfinished text proves nothing
            finished += 1
            try:
                validate(json.loads(text), schema)
            except Exception as e:  # noqa: BLE001 - show which schema and text failed
                pytest.fail(f"{schema} seed {seed}: {text!r} does not validate: {e}")
    assert finished >= len(GEN_SCHEMAS) * 2  # most outputs finish within the limits
