"""Structured output: JSON Schema -> GBNF (llama_lib.json_schema), the grammar sampler
(llama_lib.sampler) and the server's `grammar` / `json_schema` / `response_format` fields.

The grammars are checked by libllama itself: llama_sampler_init_grammar must parse them, and a
grammar sampler fed the tokens of a JSON text must accept exactly the texts the schema allows.
Generation runs on the real model with short n_predict.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import time

import pytest

from conftest import N_THREADS
from llama_lib import Engine, EngineConfig, RequestParams, SamplingParams
from llama_lib import _bindings as B
from llama_lib.gbnf import int_range
from llama_lib.json_schema import ANY_JSON_GRAMMAR, schema_to_grammar
from llama_lib.loader import lib
from llama_lib.sampler import Sampler, init_grammar

try:  # only to double-check the test cases themselves; the tests do not need it
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None


def grammar_accepts(vocab, gbnf: str, text: str) -> bool:
    """Does the grammar accept exactly `text`? Feed its tokens one by one to a grammar sampler,
    as generation would, then ask whether end-of-generation is allowed."""
    L = lib()
    smpl = init_grammar(vocab, gbnf)
    try:
        one = B.llama_token_data()
        arr = B.llama_token_data_array(ctypes.pointer(one), 1, -1, False)

        def allowed(tok: int) -> bool:
            one.id, one.logit, one.p = tok, 1.0, 0.0
            L.llama_sampler_apply(smpl, ctypes.byref(arr))
            return one.logit != -math.inf

        for tok in vocab.tokenize(text, add_special=False):
            if not allowed(int(tok)):
                return False
            L.llama_sampler_accept(smpl, int(tok))
        return allowed(vocab.eos)
    finally:
        L.llama_sampler_free(smpl)


# (schema, texts it allows, texts it does not)
CASES = [
    ({"type": "string"}, ['"hi"', '"a \\"q\\" \\u00e9"', '""'], ["hi", '"a', "1"]),
    ({"type": "integer"}, ["0", "-12", "42"], ["01", "1.5", '"1"', "-"]),
    ({"type": "number"}, ["0", "-1.25", "3e10", "2.5E-3"], ["1.", ".5", "+1", "NaN"]),
    ({"type": "boolean"}, ["true", "false"], ["True", "1"]),
    ({"type": "null"}, ["null"], ["None", "nul"]),
    ({"type": ["string", "null"]}, ['"x"', "null"], ["1"]),
    ({"enum": ["red", 2, None, {"a": [1]}]}, ['"red"', "2", "null", '{"a":[1]}'], ['"blue"', "3"]),
    ({"const": "foooooo"}, ['"foooooo"'], ['"foo"', "foooooo"]),
    ({}, ["{}", '{"a": 1, "b": [true, null]}'], ["[]", "1"]),
    ({"items": [{"type": "integer"}]}, ["[ -3000 ]", "[1]"], ["[]", "[1, 2]", '["a"]']),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
     ["[1, 2]", "[1,2,3]"], ["[1]", "[1, 2, 3, 4]", "[]"]),
    ({"type": "array", "maxItems": 0}, ["[]"], ["[1]"]),
    ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}]},
     ['["a", true]'], ['[true, "a"]', '["a"]']),
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
      "required": ["age"]},
     ['{"age": 3}', '{"name": "x", "age": 3}'], ['{"name": "x"}', "{}", '{"age": 3, "x": 1}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                       "c": {"type": "integer"}}},
     ["{}", '{"b": 1}', '{"a": 1, "c": 2}', '{"a":1,"b":2,"c":3}'], ['{"c": 1, "a": 2}', '{"a": 1,}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     ['{"a": 1, "z": "s"}', '{"z": "s"}', "{}"], ['{"z": 1}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     ['{"a": 1}', "{}"], ['{"b": 1}']),
    ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, ["5", '"ab"'], ['"abc"', "true"]),
    ({"oneOf": [{"$ref": "#/$defs/pos"}, {"type": "null"}],
      "$defs": {"pos": {"type": "integer", "minimum": 1}}}, ["1", "99", "null"], ["0", "-1"]),
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     ['{"a": "x", "b": 1}'], ['{"a": "x"}', '{"b": 1}']),
    ({"$ref": "#/definitions/node",
      "definitions": {"node": {"type": "object", "required": ["v", "next"],
                               "properties": {"v": {"type": "integer"},
                                              "next": {"anyOf": [{"type": "null"}, {"$ref": "#/definitions/node"}]}}}}},
     ['{"v": 1, "next": {"v": 2, "next": null}}'], ['{"v": 1, "next": {"v": 2}}']),
    ({"type": "string", "minLength": 2, "maxLength": 3}, ['"ab"', '"abc"', '"\\n\\t"'], ['"a"', '"abcd"']),
    ({"type": "string", "pattern": "^[A-Z][a-z]+ \\d{2}$"}, ['"Paris 75"'], ['"paris 75"', '"Paris 7"']),
    ({"type": "string", "pattern": "^(ab|c\"d)+\\.?$"}, ['"ab"', '"abc\\"d."'], ['"a"', '"."']),
    ({"type": "string", "pattern": "x[0-9]"}, ['"x1"', '"aax9bb"'], ['"x"', '"y1"']),
    ({"type": "string", "format": "date"}, ['"2024-02-29"'], ['"2024-13-01"', '"24-1-1"']),
    ({"type": "string", "format": "date-time"}, ['"2024-02-29T12:30:00Z"', '"2024-02-29T23:59:59.5+02:00"'],
     ['"2024-02-29 12:30:00"']),
    ({"type": "string", "format": "uuid"}, ['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567"']),
    ({"type": "integer", "minimum": 0, "maximum": 150}, ["0", "7", "99", "150"], ["151", "-1", "1000"]),
    ({"type": "integer", "minimum": -5, "maximum": 3}, ["-5", "0", "3"], ["-6", "4"]),
    ({"type": "integer", "exclusiveMinimum": 15}, ["16", "20", "100", "123456"], ["15", "9", "-20"]),
    ({"type": "integer", "maximum": -3}, ["-3", "-10", "-1000"], ["-2", "0", "5"]),
]


@pytest.mark.parametrize("schema,good,bad", CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_schema_grammar_accepts_exactly_the_valid_texts(vocab, schema, good, bad):
    gbnf = schema_to_grammar(schema)
    for text in good:
        json.loads(text)
        if jsonschema is not None:  # the case itself is right ("items": [...] is draft 7)
            cls = jsonschema.Draft7Validator if isinstance(schema.get("items"), list) else jsonschema.Draft202012Validator
            cls(schema).validate(json.loads(text))
        assert grammar_accepts(vocab, gbnf, text), f"{text!r} refused by\n{gbnf}"
    for text in bad:
        assert not grammar_accepts(vocab, gbnf, text), f"{text!r} accepted by\n{gbnf}"


@pytest.mark.parametrize("schema,keyword", [
    (123, "object"),
    ({"type": 123}, "type"),
    ({"type": "hiccup"}, "hiccup"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "number", "minimum": 0}, "minimum"),
    ({"type": "integer", "multipleOf": 2}, "multipleOf"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
    ({"$ref": "https://example.com/s.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"allOf": [{"$ref": 5}]}, "$ref"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "pattern"),
    ({"type": "string", "pattern": "^a\\1$"}, "pattern"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ({"enum": []}, "enum"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "allOf"),
])
def test_unsupported_or_invalid_schema_raises_naming_it(schema, keyword):
    with pytest.raises(ValueError, match=re.escape(keyword)):
        schema_to_grammar(schema)


def test_any_json_grammar(vocab):
    for text in ['{"a": [1, 2.5, "x", null, true]}', "[]", '"s"', "-3"]:
        assert grammar_accepts(vocab, ANY_JSON_GRAMMAR, text)
    assert not grammar_accepts(vocab, ANY_JSON_GRAMMAR, "{'a': 1}")


@pytest.mark.parametrize("gbnf", ["root ::= this is (not valid GBNF", "root ::= undefined-rule",
                                  'other ::= "x"', 'root ::= root "a" | "b"'])
def test_invalid_grammar_is_a_value_error_not_a_crash(vocab, gbnf):
    with pytest.raises(ValueError, match="parse grammar"):
        Sampler(SamplingParams(grammar=gbnf), vocab.n_tokens, vocab)
    with pytest.raises(ValueError, match="parse grammar"):
        SamplingParams(grammar=gbnf).validate(vocab.n_tokens, vocab)



# -- integer ranges ---------------------------------------------------------------------------

def int_gbnf_regex(gbnf: str) -> re.Pattern:
    """The Python regex for an int_range() expression (literals, [...] classes, {n} / {n,m} /
    {n,} repetitions, groups and |, which is all it writes)."""
    out = []
    for tok in re.findall(r'"[^"]*"|\[[^\]]*\]|\{\d+(?:,\d*)?\}|[()|]|\S', gbnf):
        if tok.startswith('"'):
            out.append(re.escape(tok[1:-1]))
        elif tok == "(":
            out.append("(?:")
        elif tok[0] in "[{)|":
            out.append(tok)
        else:
            raise AssertionError(f"unexpected {tok!r} in {gbnf}")
    return re.compile("".join(out))


def probes(lo, hi):
    """Integers at and around the bounds, the digit-count edges between them, and a few others."""
    xs = {0, 1, -1, 9, 10, -9, -10}
    for b in (lo, hi):
        if b is not None:
            xs |= {b - 2, b - 1, b, b + 1, b + 2}
    for k in range(1, 22):
        xs |= {10 ** k - 1, 10 ** k, 1 - 10 ** k, -(10 ** k)}
    if lo is not None and hi is not None:
        xs |= {random.randint(lo, hi) for _ in range(5)}
    return sorted(xs)


def random_bounds(rng):
    def one():
        kind = rng.random()
        if kind < 0.3:
            return rng.randint(-30, 30)
        if kind < 0.6:
            return rng.randint(-10 ** 6, 10 ** 6)
        return rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 21))
    lo, hi = one(), one()
    lo, hi = min(lo, hi), max(lo, hi)
    shape = rng.random()
    return (None, hi) if shape < 0.15 else (lo, None) if shape < 0.3 else (lo, hi)


def test_int_range_is_exact_on_random_bounds():
    rng = random.Random(1234)
    cases = [random_bounds(rng) for _ in range(1500)]
    cases += [(0, 10 ** 19), (-(10 ** 19), 10 ** 19), (10 ** 18, 10 ** 19 - 1), (-5, -5), (0, 0),
              (None, 0), (0, None), (None, -1), (1, None), (99, 100), (-100, -99)]
    for lo, hi in cases:
        g = int_range(lo, hi)
        rx = int_gbnf_regex(g)
        for x in probes(lo, hi):
            inside = (lo is None or x >= lo) and (hi is None or x <= hi)
            assert bool(rx.fullmatch(str(x))) == inside, (lo, hi, x, g)
        for text in ("-0", "00", "01", "-01", "+1", ""):
            assert not rx.fullmatch(text), (lo, hi, text, g)


@pytest.mark.parametrize("digits", [19, 20, 40, 100])
def test_int_range_grammar_is_linear_in_the_digits(digits):
    """10**19 once made an 18 MB grammar (the expansion doubled with each digit)."""
    for lo, hi in [(0, 10 ** digits), (-(10 ** digits) + 7, 10 ** digits - 3), (123, int("9" * digits)),
                   (-int("1234567890" * (digits // 10)), None)]:
        g = schema_to_grammar({"type": "integer", "minimum": lo, **({} if hi is None else {"maximum": hi})})
        assert len(g) < 250 * digits, (lo, hi, len(g))


def test_int_range_bounds_on_the_real_grammar_sampler(vocab):
    """The schema path (exclusive bounds included) checked by libllama's own grammar sampler."""
    rng = random.Random(99)
    schemas = [{"type": "integer", "minimum": 0, "maximum": 10 ** 19},
               {"type": "integer", "exclusiveMinimum": -1000, "exclusiveMaximum": 10 ** 12},
               {"type": "integer", "exclusiveMinimum": 5.5}, {"type": "integer", "maximum": -77.5},
               {"type": "integer", "minimum": -(10 ** 15), "maximum": -(10 ** 15) + 12}]
    for _ in range(20):
        lo, hi = random_bounds(rng)
        s = {"type": "integer"}
        if lo is not None:
            s["exclusiveMinimum" if rng.random() < 0.5 else "minimum"] = lo
        if hi is not None:
            s["exclusiveMaximum" if rng.random() < 0.5 else "maximum"] = hi
        if lo is not None and hi is not None and hi - lo < 2:
            continue
        schemas.append(s)
    for s in schemas:
        g = schema_to_grammar(s)
        lo = s.get("minimum", None if "exclusiveMinimum" not in s else math.floor(s["exclusiveMinimum"]) + 1)
        hi = s.get("maximum", None if "exclusiveMaximum" not in s else math.ceil(s["exclusiveMaximum"]) - 1)
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
        edges = [b + d for b in (lo, hi) if b is not None for d in (-1, 0, 1)]
        for x in edges:
            inside = (lo is None or x >= lo) and (hi is None or x <= hi)
            assert grammar_accepts(vocab, g, str(x)) == inside, (s, x)


# -- odd schemas: a grammar or a ValueError, nothing else -------------------------------------

NASTY = [
    {"allOf": [{"$ref": "#"}, {}]},
    {"allOf": [{"$ref": "#"}]},
    {"anyOf": [{"$ref": "#"}]},
    {"oneOf": [{"type": "null"}, {"$ref": "#"}]},
    {"$ref": "#"},
    {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}, {}]}}},
    {"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]}, "b": {"$ref": "#/$defs/a"}}},
    {"allOf": [{"allOf": [{"$ref": "#/allOf/0"}]}, {}]},
    {"type": ["object", "null"], "allOf": [{"$ref": "#"}, {"required": ["a"]}]},
    {"allOf": [{"properties": [1]}, {}]},
    {"allOf": [{"required": 5}, {}]},
    {"type": "integer", "minimum": float("inf")},
    {"type": "integer", "maximum": float("nan")},
    {"type": "integer", "exclusiveMinimum": -float("inf")},
    {"type": "integer", "minimum": 1e308, "maximum": 1.5e308},
    {"type": "string", "pattern": "(" * 5000 + ")" * 5000},
    {"items": {"items": {"items": {"items": {}}}}},
]


def deep(depth: int, key: str) -> dict:
    s: dict = {}
    for _ in range(depth):
        s = {key: s} if key != "properties" else {"properties": {"a": s}}
    return s


# legitimate recursion through a $ref inside an object or array: a recursive grammar
RECURSIVE = [
    ({"properties": {"a": {"allOf": [{"$ref": "#"}]}}}, ['{"a": {"a": {}}}', "{}"], ['{"a": 1}']),
    ({"properties": {"a": {"allOf": [{"$ref": "#"}, {"required": ["b"]}]}}},
     ['{"a": {"b": 1}}', '{"a": {"a": {"b": 2}, "b": 1}}', "{}"], ['{"a": {}}']),
    ({"allOf": [{"properties": {"x": {"type": "integer"}}},
                {"properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}}}]},
     ['{"x": 1, "next": {"next": null}}'], ['{"next": {"next": 1}}']),
    ({"type": "array", "items": {"$ref": "#"}}, ["[]", "[[], [[]]]"], ["[1]"]),
    # a single-entry allOf inside a merge is merged too (its parts were lost)
    ({"allOf": [{"allOf": [{"$ref": "#/$defs/x"}]}, {"properties": {"b": {}}}],
      "$defs": {"x": {"allOf": [{"properties": {"a": {}}, "required": ["a"]}, {}]}}},
     ['{"a": 1}', '{"a": 1, "b": 2}'], ['{"b": 2}', "{}"]),
]


def grammar_or_value_error(schema) -> str | None:
    try:
        g = schema_to_grammar(schema)
    except ValueError as e:
        assert str(e)
        return None
    assert isinstance(g, str) and g.startswith("root ::= ")
    return g


DEEP = [(n, k) for n in (99, 150, 3000) for k in ("items", "properties", "anyOf", "additionalProperties")]


@pytest.mark.parametrize("schema", NASTY + [deep(n, k) for n, k in DEEP],
                         ids=[json.dumps(s)[:40] for s in NASTY] + [f"{k}-nested-{n}" for n, k in DEEP])
def test_odd_schema_is_a_grammar_or_a_value_error(vocab, schema):
    g = grammar_or_value_error(schema)
    if g is not None:  # and a grammar libllama can use
        lib().llama_sampler_free(init_grammar(vocab, g))


def test_self_including_allof_is_refused_clearly():
    for schema in NASTY[:8]:
        with pytest.raises(ValueError, match="itself"):
            schema_to_grammar(schema)


@pytest.mark.parametrize("schema,good,bad", RECURSIVE, ids=[json.dumps(c[0])[:60] for c in RECURSIVE])
def test_recursive_ref_through_allof_is_a_recursive_grammar(vocab, schema, good, bad):
    gbnf = schema_to_grammar(schema)
    for text in good:
        assert grammar_accepts(vocab, gbnf, text), f"{text!r} refused by\n{gbnf}"
    for text in bad:
        assert not grammar_accepts(vocab, gbnf, text), f"{text!r} accepted by\n{gbnf}"


def test_schema_work_and_grammar_size_are_bounded():
    # a DAG of $defs, each merging the next one twice through allOf: 2**40 copies if expanded
    defs = {f"d{i}": {"type": "object", "properties": {
        "p": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {}]}, "q": {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {}]}}}
        for i in range(40)}
    defs["d40"] = {"type": "object", "properties": {"n": {"type": "integer"}}}
    # each type alternative converts the whole subschema again
    fork: dict = {"type": "integer"}
    for _ in range(40):
        fork = {"type": ["object", "object"], "properties": {"a": fork}}
    many = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}}
    for schema in ({"$ref": "#/$defs/d0", "$defs": defs}, fork, many):
        t = time.monotonic()
        with pytest.raises(ValueError, match="too complex|more than"):
            schema_to_grammar(schema)
        assert time.monotonic() - t < 5


try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover
    st = None

if st is not None:
    _REFS = st.sampled_from(["#", "#/$defs/a", "#/$defs/b", "#/properties/x", "#/allOf/0", "#/anyOf/1",
                             "#/items", "#/$defs", "#/$defs/a/allOf/0", "http://x", "#/nope", 7])
    _LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                      st.sampled_from(["string", "integer", "object", "array", "number", "null", "boolean",
                                       "date", "uuid", "^a+$", "[", "(a|b){2,3}"]))
    _KEYS = ["type", "properties", "required", "items", "prefixItems", "anyOf", "oneOf", "allOf", "$ref",
             "additionalProperties", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
             "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "pattern", "format"]

    def _schemas():
        return st.recursive(
            st.one_of(_LEAF, st.builds(lambda r: {"$ref": r}, _REFS),
                      st.builds(lambda t: {"type": t}, st.sampled_from(_TYPES_OR_LISTS))),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3),
                st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
                st.builds(lambda k, xs: {k: xs}, st.sampled_from(["anyOf", "allOf", "oneOf", "prefixItems"]),
                          st.lists(inner, min_size=1, max_size=3)),
                st.builds(lambda ps, req: {"type": "object", "properties": ps, "required": req},
                          st.dictionaries(st.sampled_from(["x", "y", "a"]), inner, max_size=3),
                          st.lists(st.sampled_from(["x", "y", "z"]), max_size=2)),
            ),
            max_leaves=12)

    _TYPES_OR_LISTS = ["string", "integer", "object", "array", ["object", "null"], ["integer", "string"], "nope"]

    @settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_schemas(), _schemas(), _schemas())
    def test_hypothesis_odd_schemas_give_a_grammar_or_a_value_error(vocab, root, a, b):
        schema = root if isinstance(root, dict) else {"anyOf": [root, {"$ref": "#"}]}
        schema = {**schema, "$defs": {"a": a, "b": b}}
        g = grammar_or_value_error(schema)
        if g is not None:  # and one libllama parses (no left recursion, no undefined rule)
            lib().llama_sampler_free(init_grammar(vocab, g))

# -- generation on the real model -------------------------------------------------------------

PROMPT = "User: Describe a person as JSON.\nAssistant:"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}


def check_person(text: str) -> None:
    """PERSON's constraints, checked by hand."""
    v = json.loads(text)
    assert isinstance(v, dict) and set(v) == {"name", "age", "role", "active"}, v
    assert isinstance(v["name"], str) and len(v["name"]) <= 12
    assert isinstance(v["age"], int) and not isinstance(v["age"], bool) and 18 <= v["age"] <= 99
    assert v["role"] in ("admin", "user", "guest") and isinstance(v["active"], bool)
    if jsonschema is not None:
        jsonschema.validate(v, PERSON)


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, EngineConfig(n_parallel=2, n_ctx=2048, n_threads=N_THREADS, n_threads_batch=N_THREADS)).start()
    yield e
    e.close()


def run(engine, prompt: str, n: int, **sampling) -> str:
    h = engine.submit(prompt, RequestParams(n_predict=n, sampling=SamplingParams(**sampling)))
    return h.result(timeout=300)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7),
                                      dict(temperature=1.5, seed=11, top_k=0, top_p=1.0, min_p=0.0)])
def test_schema_constrained_generation_validates(engine, sampling):
    text = run(engine, PROMPT, 64, grammar=schema_to_grammar(PERSON), **sampling)
    check_person(text)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5)])
def test_top_n_shortcut_picks_as_the_full_mask(engine, vocab, sampling):
    """The masked re-pick over the top tokens only must give what masking all 262k gives."""
    g = schema_to_grammar(PERSON)
    unbiased = {0: 0.0}  # a logit_bias (even a no-op one) turns the shortcut off
    with Sampler(SamplingParams(grammar=g, **sampling), vocab.n_tokens, vocab) as fast, \
            Sampler(SamplingParams(grammar=g, logit_bias=unbiased, **sampling), vocab.n_tokens, vocab) as full:
        assert fast._top_need > 0 and full._top_need == 0
    assert run(engine, PROMPT, 48, grammar=g, **sampling) == \
        run(engine, PROMPT, 48, grammar=g, logit_bias=unbiased, **sampling)


def test_yes_no_grammar_yields_exactly_one(engine):
    for seed in (1, 2, 3):
        text = run(engine, "Is the sky blue? Answer:", 8, grammar='root ::= ("yes" | "no")',
                   temperature=1.0, seed=seed)
        assert text in ("yes", "no")


def test_grammar_and_free_requests_side_by_side(engine):
    """A constrained and an unconstrained request in the same batch: only one is constrained."""
    p_free = RequestParams(n_predict=12, sampling=SamplingParams(temperature=0))
    p_num = RequestParams(n_predict=12, sampling=SamplingParams(temperature=0, grammar='root ::= [0-9]{3}'))
    a = engine.submit("The capital of France is", p_free)
    b = engine.submit("The capital of France is", p_num)
    assert len(b.result(timeout=300)) == 3 and b.result().isdigit()
    assert not a.result(timeout=300).isdigit()


def test_invalid_grammar_refused_at_submit(engine):
    with pytest.raises(ValueError, match="parse grammar"):
        engine.submit("Hello", RequestParams(n_predict=4, sampling=SamplingParams(grammar="root ::= (")))
    # the engine still works afterwards
    assert run(engine, "Hello", 2, grammar='root ::= "ok"', temperature=0) == "ok"


# -- the server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from server_util import ServerProcess
    log = tmp_path_factory.mktemp("structured") / "server.log"
    threads = os.environ.get("TEST_THREADS", "2")
    s = ServerProcess(["-np", "1", "-c", "1024", "-t", threads, "-tb", threads], log)
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def test_server_json_schema_completion(srv):
    r = srv.post("/completion", {"prompt": PROMPT, "n_predict": 64, "temperature": 0, "json_schema": PERSON})
    assert r.status_code == 200, r.text
    check_person(r.json()["content"])


def test_server_grammar_completion(srv):
    r = srv.post("/v1/completions", {"prompt": "Is the sky blue? Answer:", "max_tokens": 8,
                                      "grammar": 'root ::= ("yes" | "no")'})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("response_format,check", [
    # any object: 64 tokens may cut it short, so only its start is checked
    ({"type": "json_object"}, lambda t: t.startswith("{")),
    ({"type": "json_object", "schema": {"const": "42"}}, lambda t: json.loads(t) == "42"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
     lambda t: check_person(t) is None),
])
def test_server_chat_response_format(srv, response_format, check):
    r = srv.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Describe a person as JSON."}],
        "max_tokens": 64, "temperature": 0, "response_format": response_format})
    assert r.status_code == 200, r.text
    assert check(r.json()["choices"][0]["message"]["content"])


@pytest.mark.parametrize("path,extra,needle", [
    ("/completion", {"grammar": "root ::= this is (not valid GBNF"}, "grammar"),
    ("/v1/chat/completions", {"grammar": "root ::= this is (not valid GBNF"}, "grammar"),
    ("/v1/chat/completions", {"response_format": {"type": "sound"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object", "schema": 123}}, "schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object", "schema": {"type": "hiccup"}}}, "hiccup"),
    ("/completion", {"json_schema": {"type": "string", "pattern": "^(?<=a)$"}}, "pattern"),
    ("/completion", {"json_schema": {"const": 1}, "grammar": 'root ::= "x"'}, "both"),
    ("/completion", {"grammar": 5}, "grammar"),
])
def test_server_invalid_structured_input_is_400(srv, path, extra, needle):
    body = {"n_predict": 4, **extra}
    if path == "/completion":
        body["prompt"] = "Hi"
    else:
        body["messages"] = [{"role": "user", "content": "Hi"}]
    r = srv.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    # and the server still serves
    assert srv.post("/completion", {"prompt": "Hi", "n_predict": 1}).status_code == 200


@pytest.mark.parametrize("schema,needle", [
    ({"allOf": [{"$ref": "#"}, {}]}, "itself"),
    ({"anyOf": [{"type": "null"}, {"$ref": "#"}]}, "itself"),
    (deep(150, "items"), "nested too deeply"),
    ({"type": "integer", "minimum": 0, "maximum": 10 ** 19, "allOf": [{"$ref": "#"}]}, "allOf"),
])
def test_server_runaway_schema_is_400_quickly(srv, schema, needle):
    t = time.monotonic()
    r = srv.post("/completion", {"prompt": "Hi", "n_predict": 4, "json_schema": schema})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert time.monotonic() - t < 5
    t = time.monotonic()  # the huge integer range is now a small grammar, served as usual
    r = srv.post("/completion", {"prompt": "Hi", "n_predict": 2, "temperature": 0,
                                 "json_schema": {"type": "integer", "minimum": 0, "maximum": 10 ** 19}})
    assert r.status_code == 200, r.text
    assert time.monotonic() - t < 30
