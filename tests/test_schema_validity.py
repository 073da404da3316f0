"""Schema-constrained output validates, or the schema is refused up front.

"Validates" means ``jsonschema``'s Draft 2020-12 validator with its format
checker (the checks active in this environment are listed by
``test_format_checks_in_this_environment``). Three layers:

- explicit regression tests for every case found (exclusive ``oneOf``,
  calendar dates, formats, unknown formats, lone surrogates);
- a Hypothesis suite over random schemas from the supported subset: each is
  refused with ``GrammarError`` or its grammar's random sentences (drawn
  without a model, :mod:`gbnf_sampler`) all parse and validate, and llama.cpp
  builds a sampler from the grammar;
- the same with a real tiny random-weight model sampling at temperature 1:
  every complete reply validates.

Size: ``XYBRID_FUZZ_EXAMPLES`` examples per suite (default 40, CI-sized);
set it higher for a long local run.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from gbnf_matcher import GbnfMatcher
from gbnf_sampler import GbnfSampler
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from xybrid.errors import GrammarError
from xybrid.grammar import json_schema_to_gbnf, response_format_to_grammar

EXAMPLES = int(os.environ.get("XYBRID_FUZZ_EXAMPLES", "40"))
LONG_RUN = EXAMPLES > 40
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not LONG_RUN,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
FORMAT_CHECKER = jsonschema.Draft202012Validator.FORMAT_CHECKER


def validator(schema: Any) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER)


def problems_with(text: str, schema: Any) -> list[str]:
    """Why ``text`` is not a valid, re-encodable instance of ``schema`` (empty: it is)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    try:
        text.encode("utf-8")
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return [f"not encodable as UTF-8: {exc}"]
    return [e.message for e in validator(schema).iter_errors(value)]


def sentences(grammar: str, count: int, seed: int) -> list[str]:
    sampler = GbnfSampler(grammar)
    rng = random.Random(seed)
    return [sampler.sample(rng) for _ in range(count)]


def assert_sentences_validate(schema: Any, count: int = 200, seed: int = 0) -> None:
    grammar = json_schema_to_gbnf(schema)
    bad = [(t, p) for t in sentences(grammar, count, seed) if (p := problems_with(t, schema))]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def vocab_model(llama_cpp_dir: Path) -> Any:
    from xybrid._native._engine import Model

    return Model(str(llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"), vocab_only=True)


def llama_builds(model: Any, grammar: str) -> None:
    from xybrid._native._engine import Sampler

    Sampler(model, grammar=grammar)  # raises GrammarError if llama.cpp refuses it


def test_format_checks_in_this_environment() -> None:
    """Record which format checks run here (time / date-time need rfc3339-validator)."""
    active = set(FORMAT_CHECKER.checkers)
    assert {"date", "uuid", "ipv4", "email", "idn-email"} <= active


# ---------------------------------------------------------------------------
# oneOf
# ---------------------------------------------------------------------------

OVERLAPPING_ONE_OF = [
    {"oneOf": [{"type": "number"}, {"type": "integer"}]},
    {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]},
    {"oneOf": [{"const": 1}, {"const": 1.0}]},
    {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["b", "c"]}]},
    {"oneOf": [{"enum": ["a"]}, {"type": "string"}]},
    # No 'type' in branch 0: it accepts strings, which branch 1 writes.
    {"oneOf": [{"properties": {"a": {"type": "integer"}}}, {"type": "string"}]},
    # The discriminator is optional in branch 1, so it may write {}.
    {"oneOf": [
        {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"const": "b"}}},
    ]},
    {"oneOf": [{"type": "object"}, {"type": "object", "properties": {"x": {"type": "null"}}}]},
    {"oneOf": [{}, {"type": "null"}]},
    {"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
]


@pytest.mark.parametrize("schema", OVERLAPPING_ONE_OF, ids=lambda s: json.dumps(s)[:60])
def test_overlapping_one_of_is_refused_suggesting_any_of(schema: dict[str, Any]) -> None:
    with pytest.raises(GrammarError, match=r"'oneOf' at 'root'.*'anyOf'"):
        json_schema_to_gbnf(schema)
    # Lenient conversion keeps the documented meaning: written as a union.
    json_schema_to_gbnf(schema, strict=False)
    # The same branches under anyOf are fine.
    json_schema_to_gbnf({("anyOf" if k == "oneOf" else k): v for k, v in schema.items()})


CONSERVATIVE = object()


def test_refused_one_of_really_overlaps_except_where_conservative() -> None:
    """A value matching two branches exists for each refused schema but one.

    The exception is refused although exclusive (branch 1's {} fails branch 0,
    which requires "k"): the proofs only use a discriminator that is required
    in the branch writing it. Refusing is the sound side of that doubt.
    """
    witnesses = [1, "s", 1, "b", "a", "s", CONSERVATIVE, {}, None, {"a": 1, "b": 2}]
    for schema, value in zip(OVERLAPPING_ONE_OF, witnesses, strict=True):
        if value is CONSERVATIVE:
            continue
        branches = schema["oneOf"]
        rest = {k: v for k, v in schema.items() if k != "oneOf"}
        matching = [b for b in branches if validator({"allOf": [rest, b]}).is_valid(value)]
        assert len(matching) >= 2, (schema, value)
        assert not validator(schema).is_valid(value)


EXCLUSIVE_ONE_OF = [
    {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    {"oneOf": [{"type": ["string", "null"]}, {"type": "array", "items": {"type": "integer"}}]},
    {"oneOf": [{"enum": ["a", "b"]}, {"enum": ["c"]}, {"type": "integer"}]},
    {"oneOf": [{"const": True}, {"const": 1}]},  # true is not 1 in JSON Schema
    {"oneOf": [{"const": "x"}, {"type": "integer", "minimum": 3}]},
    {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"},
                                          "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"enum": ["square", "rect"]},
                                          "w": {"type": "integer"}},
         "required": ["kind"], "additionalProperties": False},
    ]},
    {"$defs": {"a": {"type": "object", "properties": {"t": {"const": 1}}, "required": ["t"]},
               "b": {"type": "object", "properties": {"t": {"const": 2}}, "required": ["t"]}},
     "oneOf": [{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}]},
]


@pytest.mark.parametrize("schema", EXCLUSIVE_ONE_OF, ids=lambda s: json.dumps(s)[:60])
def test_exclusive_one_of_is_a_union_whose_sentences_validate(schema: dict[str, Any],
                                                              vocab_model: Any) -> None:
    llama_builds(vocab_model, json_schema_to_gbnf(schema))
    assert_sentences_validate(schema)


def test_one_of_refusal_reaches_response_format() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": OVERLAPPING_ONE_OF[0]}}
    with pytest.raises(GrammarError, match="oneOf"):
        response_format_to_grammar(rf)
    rf["json_schema"]["strict"] = False  # type: ignore[index]
    assert response_format_to_grammar(rf)


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def _quoted(text: str) -> str:
    return json.dumps(text)


def test_date_is_exactly_the_calendar() -> None:
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "string", "format": "date"}))
    years = [0, 1, 4, 99, 100, 200, 300, 400, 1600, 1700, 1900, 1996, 2000, 2023, 2024, 2100,
             2400, 9996, 9999]
    wrong = []
    for year in years:
        for month in range(0, 14):
            for day in range(0, 33):
                text = f"{year:04d}-{month:02d}-{day:02d}"
                ok = FORMAT_CHECKER.conforms(text, "date")
                if matcher.matches(_quoted(text)) != ok:
                    wrong.append(text)
    assert not wrong, wrong[:20]
    for found in ["2023-02-30", "2023-02-29", "1900-02-29", "0000-01-01", "2023-04-31"]:
        assert not matcher.matches(_quoted(found)), found
    for good in ["2024-02-29", "2000-02-29", "0400-02-29", "0001-01-01", "9999-12-31"]:
        assert matcher.matches(_quoted(good)), good


def _rfc3339_time(text: str) -> bool:
    """RFC 3339 full-time, as rfc3339-validator (jsonschema's time check) reads it."""
    pattern = (r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
               r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
    return re.fullmatch(pattern, text, re.IGNORECASE) is not None


def test_time_and_date_time_sentences_are_rfc3339() -> None:
    for fmt in ("time", "date-time"):
        grammar = json_schema_to_gbnf({"type": "string", "format": fmt})
        for text in sentences(grammar, 400, seed=1):
            value = json.loads(text)
            if fmt == "time":
                assert _rfc3339_time(value), value
            else:
                day, sep, clock = value.partition("T")
                assert sep and FORMAT_CHECKER.conforms(day, "date") and _rfc3339_time(clock), value
                datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "string", "format": "date-time"}))
    assert not matcher.matches(_quoted("2023-02-29T12:00:00Z"))
    assert not matcher.matches(_quoted("2023-01-01T12:00:60Z"))
    assert matcher.matches(_quoted("2024-02-29T23:59:59.123+05:30"))


def test_ipv4_is_exactly_dotted_quads() -> None:
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "string", "format": "ipv4"}))
    octets = ["0", "1", "9", "10", "01", "00", "99", "100", "199", "200", "249", "250", "255",
              "256", "300", "001", "1000"]
    rng = random.Random(3)
    for _ in range(600):
        text = ".".join(rng.choice(octets) for _ in range(rng.choice([3, 4, 4, 4, 5])))
        try:
            ok = bool(ipaddress.IPv4Address(text))
        except ipaddress.AddressValueError:
            ok = False
        assert matcher.matches(_quoted(text)) == ok, text


def test_email_sentences_validate_and_stay_plain() -> None:
    for fmt in ("email", "idn-email"):
        schema = {"type": "string", "format": fmt}
        assert_sentences_validate(schema, count=300, seed=4)
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "string", "format": "email"}))
    for good in ["a@b.co", "first.last+tag@mail.example.org", "x_y@a-b.c1"]:
        assert matcher.matches(_quoted(good)), good
    for bad in ["anything goes", "a@b", "@b.c", "a..b@c.d", ".a@b.c", "a@-b.c", "a@b-.c",
                "a b@c.d"]:
        assert not matcher.matches(_quoted(bad)), bad


@pytest.mark.parametrize("fmt", ["date", "time", "date-time", "uuid", "ipv4", "email"])
def test_every_supported_format_validates(fmt: str, vocab_model: Any) -> None:
    schema = {"type": "string", "format": fmt}
    llama_builds(vocab_model, json_schema_to_gbnf(schema))
    assert_sentences_validate(schema, count=300, seed=5)


@pytest.mark.parametrize("fmt", ["hostname", "uri", "ipv6", "regex", "duration", "int32", "Date"])
def test_unknown_format_is_refused_naming_it_and_the_supported_list(fmt: str) -> None:
    schema = {"type": "object", "properties": {"f": {"type": "string", "format": fmt}}}
    with pytest.raises(GrammarError) as info:
        json_schema_to_gbnf(schema)
    message = str(info.value)
    assert f"'format' {fmt!r} at 'root-f'" in message
    assert "date, date-time, email, idn-email, ipv4, time, uuid" in message
    # strict=False: the format is ignored and the value is any string.
    matcher = GbnfMatcher(json_schema_to_gbnf(schema, strict=False))
    assert matcher.matches('{"f": "not checked"}')


def test_format_on_non_strings_is_an_annotation() -> None:
    """jsonschema checks formats on strings only; OpenAPI's int32 on an integer is fine."""
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "integer", "format": "int32"}))
    assert matcher.matches("12") and not matcher.matches('"12"')


def test_non_string_format_is_refused() -> None:
    with pytest.raises(GrammarError, match="'format' at 'root' must be a string"):
        json_schema_to_gbnf({"type": "string", "format": 3})


def test_format_and_lengths() -> None:
    # Every date has 10 characters: these bounds are met by all, or by none.
    assert GbnfMatcher(json_schema_to_gbnf(
        {"type": "string", "format": "date", "minLength": 10, "maxLength": 12}
    )).matches('"2024-02-29"')
    with pytest.raises(GrammarError, match="no 'date' value has a length"):
        json_schema_to_gbnf({"type": "string", "format": "date", "maxLength": 9})
    with pytest.raises(GrammarError, match="only some of its values meet"):
        json_schema_to_gbnf({"type": "string", "format": "email", "maxLength": 20})
    lenient = json_schema_to_gbnf({"type": "string", "format": "email", "maxLength": 20},
                                  strict=False)
    assert GbnfMatcher(lenient).matches('"a@b.cd"')


# ---------------------------------------------------------------------------
# Strings: Unicode scalar values only
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 4},
                                    {"type": "object", "additionalProperties": True}, {}])
def test_no_lone_surrogate_escapes(schema: dict[str, Any]) -> None:
    matcher = GbnfMatcher(json_schema_to_gbnf(schema))
    wrap = (lambda s: "{" + s + ': 1}') if schema.get("type") == "object" else (lambda s: s)
    for lone in [r'"\ud800"', r'"\uDBFF"', r'"\udc00"', r'"\uDFFFx"', r'"a\ud83d"',
                 r'"\ude00\ud83d"', '"\ud800"', '"\udfff"']:
        assert not matcher.matches(wrap(lone)), lone
    for fine in [r'"\ud83d\ude00"', r'"\uD83D\uDE00"', '"\U0001F600"', r'"\ud7ff\ue000"',
                 '"\ufffd"', '"\U0010ffff"', r'"\u0000"']:
        assert matcher.matches(wrap(fine)), fine
        assert not problems_with(wrap(fine), schema), fine


def test_surrogate_pair_counts_as_one_character() -> None:
    schema = {"type": "string", "minLength": 2, "maxLength": 2}
    matcher = GbnfMatcher(json_schema_to_gbnf(schema))
    assert matcher.matches(r'"\ud83d\ude00a"') and matcher.matches('"\U0001F600a"')
    assert not matcher.matches(r'"\ud83d\ude00"')
    assert not matcher.matches(r'"\ud83d\ude00ab"')
    assert_sentences_validate(schema, count=300, seed=6)


def test_string_sentences_are_valid_utf8_text(vocab_model: Any) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "maxItems": 4}
    llama_builds(vocab_model, json_schema_to_gbnf(schema))
    assert_sentences_validate(schema, count=400, seed=7)


# ---------------------------------------------------------------------------
# Random schemas (Hypothesis)
# ---------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "kind", "id", "x y", "é", "n"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5),
                    st.sampled_from([0.5, -1.25, 1.0]), st.sampled_from(["a", "b", "", "é"]))
FORMATS = st.sampled_from(["date", "time", "date-time", "uuid", "ipv4", "email", "hostname"])


def _numbers(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    bound = st.one_of(st.integers(-100, 100), st.sampled_from([-2.5, 0.25, 3.75]))
    return st.fixed_dictionaries(
        {"type": st.just(kind)},
        optional={"minimum": bound, "maximum": bound, "exclusiveMinimum": bound,
                  "exclusiveMaximum": bound},
    )


LEAVES = st.one_of(
    st.just({"type": "null"}),
    st.just({"type": "boolean"}),
    _numbers("integer"),
    _numbers("number"),
    st.fixed_dictionaries({"type": st.just("string")},
                          optional={"minLength": st.integers(0, 4), "maxLength": st.integers(0, 8)}),
    st.fixed_dictionaries({"type": st.just("string"), "format": FORMATS}),
    st.builds(lambda v: {"const": v}, SCALARS),
    st.builds(lambda vs: {"enum": vs}, st.lists(SCALARS, min_size=1, max_size=4)),
    st.just({}),
)


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def obj(props: dict[str, Any], required: list[str], extra: Any) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "properties": props,
                                  "required": [r for r in required if r in props]}
        if extra != "absent":
            schema["additionalProperties"] = extra
        return schema

    objects = st.builds(
        obj,
        st.dictionaries(NAMES, children, max_size=3),
        st.lists(NAMES, max_size=3, unique=True),
        st.one_of(st.just("absent"), st.booleans(), children),
    )
    arrays = st.builds(
        lambda items, lo, hi: {"type": "array", "items": items,
                               **({"minItems": lo} if lo is not None else {}),
                               **({"maxItems": hi} if hi is not None else {})},
        children, st.none() | st.integers(0, 3), st.none() | st.integers(0, 4),
    )
    unions = st.builds(lambda kw, opts: {kw: opts}, st.sampled_from(["anyOf", "oneOf"]),
                       st.lists(children, min_size=1, max_size=3))
    tagged = st.builds(
        lambda tags, bodies: {"oneOf": [
            {"type": "object", "properties": {"kind": {"const": t}, "v": b}, "required": ["kind"]}
            for t, b in zip(tags, bodies)]},
        st.lists(st.sampled_from(["a", "b", "c", 1, True]), min_size=1, max_size=3, unique=True),
        st.lists(children, min_size=3, max_size=3),
    )
    return st.one_of(objects, arrays, unions, tagged)


SCHEMAS = st.recursive(LEAVES, _extend, max_leaves=8)


@FUZZ
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_fuzz_grammar_sentences_validate(schema: Any, seed: int, vocab_model: Any) -> None:
    try:
        grammar = json_schema_to_gbnf(schema)
    except GrammarError as exc:
        assert str(exc)
        event("refused")
        return
    event("converted")
    llama_builds(vocab_model, grammar)
    bad = [(t, p) for t in sentences(grammar, 25, seed) if (p := problems_with(t, schema))]
    assert not bad, (schema, bad[:3])


@pytest.fixture(scope="module")
def tiny_backend(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    from xybrid import LlamaCppBackend, LlmConfig

    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=512, n_threads=1)) as backend:
        yield backend


MODEL_EXAMPLES = max(1, EXAMPLES // 2)
COMPLETE: list[int] = []


@settings(FUZZ, max_examples=MODEL_EXAMPLES)
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_fuzz_tiny_model_replies_validate(schema: Any, seed: int, tiny_backend: Any) -> None:
    from xybrid import GenerationConfig

    try:
        json_schema_to_gbnf(schema)
    except GrammarError:
        return
    config = GenerationConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                              max_tokens=48, json_schema=schema)
    out = tiny_backend.generate_raw("JSON:", config)
    if out.finish_reason == "length":
        event("cut at max_tokens")
        return
    event("complete reply")
    COMPLETE.append(1)
    assert not problems_with(out.text, schema), (schema, out.text)


def test_fuzz_tiny_model_finished_some_replies() -> None:
    """The model suite is not vacuous: some replies ran to completion (run after it)."""
    assert COMPLETE, "no tiny-model reply finished within max_tokens"
