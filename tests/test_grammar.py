"""Tests of xybrid.grammar: grammar pre-checks and the JSON-schema converter.

Every grammar the converter produces is checked three ways: llama.cpp must
parse it (a grammar sampler is built on a vocab-only model), the pure-Python
Earley matcher in ``gbnf_matcher`` must accept valid instances and reject
invalid ones, and, when a C++ compiler is at hand, llama.cpp's own matcher must
agree with the Python one on every instance. ``jsonschema`` confirms that the
instance lists themselves are right.
"""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from gbnf_matcher import GbnfMatcher, LlamaOracle, build_llama_oracle, check_instances

from xybrid.errors import GrammarError, InvalidInputError
from xybrid.grammar import (
    JSON_OBJECT_GBNF,
    MAX_GRAMMAR_ALTERNATIONS,
    MAX_GRAMMAR_BYTES,
    json_schema_to_gbnf,
    json_value_grammar,
    response_format_to_grammar,
    validate_grammar,
)

# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vocab_model(llama_cpp_dir: Path) -> Any:
    from xybrid._native._engine import Model

    return Model(str(llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"), vocab_only=True)


@pytest.fixture(scope="session")
def llama_oracle(
    llama_cpp_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LlamaOracle | str:
    return build_llama_oracle(llama_cpp_dir, tmp_path_factory.getbasetemp() / "gbnf-oracle")


def llama_parses(model: Any, grammar: str) -> bool:
    """True when llama.cpp builds a grammar sampler from ``grammar``."""
    from xybrid._native._engine import Sampler

    try:
        Sampler(model, grammar=grammar)
    except GrammarError:
        return False
    return True


def require_oracle(oracle: LlamaOracle | str) -> LlamaOracle:
    if isinstance(oracle, str):
        pytest.skip(f"llama.cpp grammar oracle unavailable: {oracle}")
    return oracle


# ---------------------------------------------------------------------------
# validate_grammar: the bounds of seed 002
# ---------------------------------------------------------------------------

SEED_SMALL = 'root ::= "yes" | "no"'
SEED_JSON = r"""
    root   ::= object
    object ::= "{" ws members? ws "}"
    members ::= pair ("," ws pair)*
    pair   ::= string ws ":" ws value
    value  ::= object | string | number | "true" | "false" | "null"
    string ::= "\"" [^"]* "\""
    number ::= [0-9]+ ("." [0-9]+)?
    ws     ::= [ \t\n]*
"""


def padded(grammar: str, total_bytes: int) -> str:
    """``grammar`` plus a comment line bringing it to exactly ``total_bytes``."""
    head = grammar + "\n# "
    pad = total_bytes - len(head.encode("utf-8"))
    assert pad >= 0
    return head + "x" * pad


def test_limits_match_seed() -> None:
    assert MAX_GRAMMAR_BYTES == 64 * 1024
    assert MAX_GRAMMAR_ALTERNATIONS == 4096


@pytest.mark.parametrize("grammar", [SEED_SMALL, SEED_JSON])
def test_seed_grammars_accepted_and_returned_unchanged(grammar: str, vocab_model: Any) -> None:
    assert validate_grammar(grammar) is grammar
    assert llama_parses(vocab_model, grammar)


def test_size_bound_is_inclusive_and_counts_utf8_bytes() -> None:
    at_limit = padded(SEED_SMALL, MAX_GRAMMAR_BYTES)
    assert len(at_limit.encode()) == MAX_GRAMMAR_BYTES
    assert validate_grammar(at_limit) == at_limit
    with pytest.raises(GrammarError, match=r"65537 bytes, over the limit of 65536"):
        validate_grammar(at_limit + "x")
    # 'é' is two bytes: a grammar under the limit in characters can be over it in bytes.
    multibyte = padded('root ::= "é"', MAX_GRAMMAR_BYTES - 1) + "é"
    assert len(multibyte) < MAX_GRAMMAR_BYTES < len(multibyte.encode())
    with pytest.raises(GrammarError, match="bytes"):
        validate_grammar(multibyte)


def test_alternation_bound_is_inclusive_and_counts_every_bar() -> None:
    # Bars in comments and literals count too, as in the seed.
    at_limit = 'root ::= "a" | "|"\n# ' + "|" * (MAX_GRAMMAR_ALTERNATIONS - 2)
    assert at_limit.count("|") == MAX_GRAMMAR_ALTERNATIONS
    assert validate_grammar(at_limit) == at_limit
    with pytest.raises(GrammarError, match=r"4097 '\|' alternation operators, over the limit of 4096"):
        validate_grammar(at_limit + "|")


def test_bounds_are_checked_before_syntax() -> None:
    # Seed: a bare run of bars is judged by the count alone.
    with pytest.raises(GrammarError, match="alternation"):
        validate_grammar("|" * (MAX_GRAMMAR_ALTERNATIONS + 1))
    with pytest.raises(GrammarError, match="bytes"):
        validate_grammar("x" * (MAX_GRAMMAR_BYTES + 1))


@pytest.mark.parametrize("value", [None, 42, b'root ::= "a"', ["root ::= 'a'"]])
def test_non_string_grammar_rejected(value: object) -> None:
    with pytest.raises(GrammarError, match="must be a str"):
        validate_grammar(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["", "   \n\t", "# only a comment\n"])
def test_empty_grammar_rejected(value: str) -> None:
    with pytest.raises(GrammarError, match="empty|no 'root'"):
        validate_grammar(value)


BAD_GRAMMARS = [
    ('item ::= "a"', "no 'root' rule"),
    ('root ::= "abc', "unterminated string literal"),
    ('root ::= "a"\nitem ::= "b', "line 2, column 10: unterminated string literal"),
    ("root ::= [a-z", "unterminated character class"),
    ('root ::= ( "a" | "b"', "unclosed '('"),
    ('root ::= "a" )', "unbalanced ')'"),
    ('root ::= "a" ]', "unbalanced ']'"),
    ("root ::= item", "rule 'item' is used but never defined"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "needs 2 hex digits"),
    ('root "a"', "expected '::='"),
    ('root ::= my_rule\nmy_rule ::= "a"', "letters, digits and '-'"),
    ('root ::= * "a"', "nothing before it to repeat"),
    ('root ::= {2} "a"', "nothing before it to repeat"),
    ('root ::= "a"{2001}', "over llama.cpp's limit of 2000"),
    ('root ::= "a"{2,x}', "expected '}'"),
    ('root ::= "a"{x}', "expected an integer"),
    ('root ::= "a"\n  | "b"', "expected a rule name"),
    ('root ::= "a" @', "unexpected '@'"),
    ("root ::= <[12", "expected ']>'"),
]


@pytest.mark.parametrize(("grammar", "message"), BAD_GRAMMARS)
def test_structural_errors_are_named(grammar: str, message: str, vocab_model: Any) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        validate_grammar(grammar)
    # Every grammar refused here is refused by llama.cpp as well.
    assert not llama_parses(vocab_model, grammar)


def test_max_below_min_repetition_is_refused() -> None:
    # llama.cpp would compute (max - min) unsigned and loop for ages: refuse early.
    with pytest.raises(GrammarError, match="max below min"):
        validate_grammar('root ::= "a"{5,2}')


GOOD_GRAMMARS = [
    'root ::= "a" "b"* "c"+ "d"? "e"{2} "f"{1,} "g"{0,3}',
    'root ::= ( "a" |\n  "b" ) # trailing comment\n',
    'root ::= "a" |\n  "b"',  # a newline right after '|' continues the rule
    "root ::= [^\"\\\\\\x00-\\x1F] . [a-zA-Z0-9_\\-] [\\]\\[]",
    'root ::= "\\u00e9\\U0001F600\\t\\n\\r\\"\\\\"',
    "root ::= x-1\nx-1 ::= ( ( \"a\" ) )\r\n",
    'root ::= "é" "日本" [α-ω]',
    'root ::= "a" | ',
    "root ::=",
    'root ::= "a"{ 1 , 2 }',
]
# ("root ::= []" is valid syntax that llama.cpp parses, but the class matches
# nothing: validate_grammar refuses it; see tests/test_hardening.py.)


@pytest.mark.parametrize("grammar", GOOD_GRAMMARS)
def test_valid_syntax_variants_pass(grammar: str, vocab_model: Any) -> None:
    assert validate_grammar(grammar) == grammar
    assert llama_parses(vocab_model, grammar), "llama.cpp must accept what the pre-check accepts"


def test_single_character_deletions_agree_with_llama(vocab_model: Any) -> None:
    """Mutants of real grammars: the pre-check and llama.cpp give the same verdict."""
    rng = random.Random(2)
    sources = [
        SEED_JSON,
        JSON_OBJECT_GBNF,
        json_schema_to_gbnf(
            {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 40}}}
        ),
    ]
    checked = 0
    for source in sources:
        for pos in rng.sample(range(len(source)), min(60, len(source))):
            mutant = source[:pos] + source[pos + 1 :]
            try:
                validate_grammar(mutant)
                ours = True
            except GrammarError:
                ours = False
            assert ours == llama_parses(vocab_model, mutant), (pos, mutant)
            checked += 1
    assert checked >= 150


# ---------------------------------------------------------------------------
# Schema families: grammar accepts valid, rejects invalid
# ---------------------------------------------------------------------------


def styles(value: Any) -> list[str]:
    """The same JSON value written compactly, with default spacing and indented."""
    out = [
        json.dumps(value, separators=(",", ":"), ensure_ascii=False),
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, indent=2, ensure_ascii=False),
    ]
    return list(dict.fromkeys(out))


class Family:
    """A schema with valid instances (values), invalid texts, and texts the
    schema accepts but the grammar deliberately does not generate."""

    def __init__(
        self,
        name: str,
        schema: dict[str, Any] | bool,
        valid: list[Any],
        invalid: list[str],
        narrowed: list[str] = (),  # type: ignore[assignment]
        valid_texts: list[str] = (),  # type: ignore[assignment]
    ) -> None:
        self.name = name
        self.schema = schema
        self.valid = [text for value in valid for text in styles(value)] + list(valid_texts)
        self.invalid = invalid
        self.narrowed = list(narrowed)

    def __repr__(self) -> str:
        return self.name


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age"],
}

TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value"],
        }
    },
    "$ref": "#/$defs/node",
}

PYDANTIC_LIKE = {
    "title": "Order",
    "type": "object",
    "description": "An order, as pydantic writes it.",
    "properties": {
        "id": {"title": "Id", "type": "string", "format": "uuid"},
        "placed": {"title": "Placed", "type": "string", "format": "date-time"},
        "items": {"title": "Items", "type": "array", "items": {"$ref": "#/definitions/Item"}, "minItems": 1},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    },
    "required": ["id", "placed", "items"],
    "definitions": {
        "Item": {
            "title": "Item",
            "type": "object",
            "properties": {
                "sku": {"type": "string", "minLength": 3, "maxLength": 3},
                "qty": {"type": "integer", "exclusiveMinimum": 0},
                "unit": {"$ref": "#/definitions/Unit"},
            },
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "Unit": {"enum": ["kg", "pcs"], "type": "string", "description": "unit"},
    },
}

FAMILIES = [
    Family(
        "person",
        PERSON,
        valid=[
            {"name": "Ada", "age": 36},
            {"name": "B", "age": 0, "active": True},
            {"name": "Al Khwarizmi", "age": 150, "email": "a@b.c", "tags": ["x", "y", "z"]},
            {"name": "Zoë 日本", "age": 99, "tags": [], "active": False},
            {"name": 'q"b\\s\n/', "age": 7, "email": ""},
            {"name": "é", "age": 12, "email": "\u0001", "tags": ["\t"], "active": True},
        ],
        invalid=[
            "{}",
            '{"name": "Ada"}',
            '{"age": 3}',
            '{"name": "", "age": 3}',
            '{"name": "Thirteen char", "age": 3}',
            '{"name": "Ada", "age": 151}',
            '{"name": "Ada", "age": -1}',
            '{"name": "Ada", "age": 3.5}',
            '{"name": "Ada", "age": "3"}',
            '{"name": "Ada", "age": 03}',
            '{"name": "Ada", "age": 3, "tags": ["a", "b", "c", "d"]}',
            '{"name": "Ada", "age": 3, "tags": [1]}',
            '{"name": "Ada", "age": 3, "active": "yes"}',
            '{"name": "Ada", "age": 3,}',
            '{"name": "Ada" "age": 3}',
            '{"name": "A\u0001", "age": 3}',
            '{"name": "A\\x", "age": 3}',
            '{"name": "Ada", "age": 3',
            '["Ada", 3]',
        ],
        narrowed=[
            '{"age": 3, "name": "Ada"}',  # properties come in declared order
            '{"name": "Ada", "age": 3, "extra": 1}',  # closed by default
            '{"name": "Ada", "age": 3.0}',  # integers without fraction
            '{"name": "Ada",   "age": 3}',  # at most one space
            '{"name": "Ada", "age": 3e1}',
            '{"name": "Ada", "age": 3} ',  # no whitespace around the value
        ],
    ),
    Family(
        "enum-const",
        {
            "type": "object",
            "properties": {
                "color": {"enum": ["red", "green", "blue"]},
                "kind": {"const": "fixed"},
                "level": {"enum": [1, 2.5, None, True, {"a": [1]}]},
                "typed": {"type": "string", "enum": ["s", 1]},
            },
            "required": ["color", "kind", "level"],
        },
        valid=[
            {"color": "red", "kind": "fixed", "level": 1},
            {"color": "blue", "kind": "fixed", "level": 2.5, "typed": "s"},
            {"color": "green", "kind": "fixed", "level": None},
            {"color": "green", "kind": "fixed", "level": True},
        ],
        valid_texts=['{"color": "green", "kind": "fixed", "level": {"a":[1]}}'],
        invalid=[
            '{"color": "yellow", "kind": "fixed", "level": 1}',
            '{"color": "red", "kind": "loose", "level": 1}',
            '{"color": "red", "kind": "fixed", "level": 3}',
            '{"color": "red", "kind": "fixed", "level": false}',
            '{"color": "red", "kind": "fixed", "level": {"a": [2]}}',
            '{"color": "red", "kind": "fixed", "level": 1, "typed": 2}',
            '{"color": "RED", "kind": "fixed", "level": 1}',
            '{"color": "red", "level": 1}',
            '{"color": "red", "kind": "fixed", "level": 1, "typed": 1}',
        ],
        narrowed=['{"color": "red", "kind": "fixed", "level": {"a": [ 1 ]}}'],  # compact literals
    ),
    Family(
        "unions",
        {
            "type": "object",
            "properties": {
                "id": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0}]},
                "maybe": {"type": ["string", "null"]},
                "either": {"oneOf": [{"type": "boolean"}, {"type": "array", "items": {"type": "integer"}}]},
                "opt": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "required": ["id", "maybe", "either"],
            "additionalProperties": False,
        },
        valid=[
            {"id": "ab", "maybe": None, "either": True},
            {"id": 12, "maybe": "x", "either": [1, -2, 3]},
            {"id": 0, "maybe": "", "either": [], "opt": None},
            {"id": "", "maybe": None, "either": False, "opt": -4},
        ],
        invalid=[
            '{"id": "abcde", "maybe": null, "either": true}',
            '{"id": -1, "maybe": null, "either": true}',
            '{"id": 1, "maybe": 1, "either": true}',
            '{"id": 1, "maybe": null, "either": [true]}',
            '{"id": 1, "maybe": null, "either": null}',
            '{"id": 1, "maybe": null, "either": true, "opt": "x"}',
            '{"id": null, "maybe": null, "either": true}',
        ],
    ),
    Family(
        "recursive-ref",
        TREE,
        valid=[
            {"value": 1},
            {"value": 1, "children": []},
            {"value": 1, "children": [{"value": 2}, {"value": 3, "children": [{"value": 4}]}]},
        ],
        invalid=[
            "{}",
            '{"value": 1, "children": [{}]}',
            '{"value": 1, "children": [{"value": "2"}]}',
            '{"value": 1, "children": {"value": 2}}',
        ],
        narrowed=['{"children": [], "value": 1}'],
    ),
    Family(
        "pydantic-like",
        PYDANTIC_LIKE,
        valid=[
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "placed": "2024-02-29T12:30:00Z",
                "items": [{"sku": "ABC", "qty": 1}],
            },
            {
                "id": "00000000-0000-0000-0000-00000000ABCD",
                "placed": "1999-12-31T23:59:59.123+05:30",
                "items": [{"sku": "xyz", "qty": 12, "unit": "kg"}, {"sku": "é日本", "qty": 3, "unit": "pcs"}],
                "note": None,
            },
            {
                "id": "123e4567-e89b-12d3-a456-426614174000",
                "placed": "2024-01-01T00:00:00-08:00",
                "items": [{"sku": "abc", "qty": 99999}],
                "note": "leave at door",
            },
        ],
        invalid=[
            '{"id": "123", "placed": "2024-02-29T12:30:00Z", "items": [{"sku": "ABC", "qty": 1}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-13-29T12:30:00Z", '
            '"items": [{"sku": "ABC", "qty": 1}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29 12:30:00Z", '
            '"items": [{"sku": "ABC", "qty": 1}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29T12:30:00Z", '
            '"items": []}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29T12:30:00Z", '
            '"items": [{"sku": "ABC", "qty": 0}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29T12:30:00Z", '
            '"items": [{"sku": "ABCD", "qty": 1}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29T12:30:00Z", '
            '"items": [{"sku": "ABC", "qty": 1, "unit": "lb"}]}',
            '{"id": "123e4567-e89b-12d3-a456-426614174000", "placed": "2024-02-29T12:30:00Z", '
            '"items": [{"sku": "ABC", "qty": 1, "colour": "red"}]}',
        ],
    ),
    Family(
        "arrays",
        {
            "type": "object",
            "properties": {
                "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
                "some": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
                "exact": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
                "tuple-rest": {"type": "array", "prefixItems": [{"const": "head"}], "items": {"type": "null"}},
                "anything": {"type": "array"},
            },
            "required": ["pair", "some", "exact"],
        },
        valid=[
            {"pair": ["a", 1], "some": [1, 2], "exact": [True, False]},
            {"pair": ["", -7], "some": [1.5, -2e3, 0, 4], "exact": [False, False], "tuple-rest": ["head"]},
            {"pair": ["x", 0], "some": [0.25, 1], "exact": [True, True], "tuple-rest": ["head", None, None],
             "anything": [1, "two", [3], {"four": 4}, None]},
            {"pair": ["x", 0], "some": [0, 0, 0], "exact": [True, True], "anything": []},
        ],
        invalid=[
            '{"pair": ["a", 1, 2], "some": [1, 2], "exact": [true, false]}',
            '{"pair": [1, "a"], "some": [1, 2], "exact": [true, false]}',
            '{"pair": ["a", 1], "some": [1], "exact": [true, false]}',
            '{"pair": ["a", 1], "some": [1, 2, 3, 4, 5], "exact": [true, false]}',
            '{"pair": ["a", 1], "some": [1, 2], "exact": [true]}',
            '{"pair": ["a", 1], "some": [1, 2], "exact": [true, false, true]}',
            '{"pair": ["a", 1], "some": [1, 2], "exact": [true, false], "tuple-rest": ["tail"]}',
            '{"pair": ["a", 1], "some": [1, 2], "exact": [true, false], "tuple-rest": ["head", 1]}',
            '{"pair": ["a", 1], "some": [1, 2,], "exact": [true, false]}',
        ],
        narrowed=[
            '{"pair": ["a"], "some": [1, 2], "exact": [true, false]}',  # prefixItems all present
            '{"pair": ["a", 1], "some": [1, 2], "exact": [true, false], "tuple-rest": []}',
        ],
    ),
    Family(
        "open-objects",
        {
            "type": "object",
            "properties": {
                "free": {"type": "object"},
                "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                "declared-open": {
                    "type": "object",
                    "properties": {"a": {"type": "string"}},
                    "required": ["a"],
                    "additionalProperties": True,
                },
                "needs-b": {"type": "object", "required": ["b"]},
            },
        },
        valid=[
            {},
            {"free": {}},
            {"free": {"x": [1, {"y": None}], "z": "w"}, "counts": {}},
            {"counts": {"apples": 3, "pears": -1}},
            {"declared-open": {"a": "x"}},
            {"declared-open": {"a": "x", "b": 2, "c": [True]}},
            {"needs-b": {"b": [1, 2]}},
        ],
        invalid=[
            '{"free": []}',
            '{"counts": {"apples": "3"}}',
            '{"counts": {"apples": 1.5}}',
            '{"declared-open": {"b": 2}}',
            '{"needs-b": {}}',
            '{"free": {"x" 1}}',
        ],
        narrowed=['{"declared-open": {"b": 2, "a": "x"}}'],
    ),
    Family(
        "all-of",
        {
            "allOf": [
                {"$ref": "#/$defs/base"},
                {"type": "object", "properties": {"extra": {"type": "boolean"}}, "required": ["extra"]},
            ],
            "$defs": {
                "base": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1}},
                    "required": ["id"],
                }
            },
        },
        valid=[{"id": 1, "extra": True}, {"id": 42, "extra": False}],
        invalid=['{"id": 0, "extra": true}', '{"id": 1}', '{"extra": true}', '{"id": 1, "extra": 1}'],
        narrowed=['{"id": 1, "extra": true, "more": 1}'],
    ),
    Family(
        "scalars-root",
        {"type": "array", "items": {"anyOf": [{"type": "null"}, {"type": "boolean"}, {"type": "string"}]}},
        valid=[[], [None], [True, False, "s", None], ["\\", "\"", "/", "\u2028"]],
        invalid=["null", "[1]", "[nul]", "[True]", "[\"a\" \"b\"]", "[,]", "[\"\\u12\"]"],
    ),
    Family(
        "string-formats",
        {
            "type": "object",
            "properties": {
                "day": {"type": "string", "format": "date"},
                "clock": {"type": "string", "format": "time"},
                "uid": {"type": "string", "format": "uuid"},
                "email": {"type": "string", "format": "email"},
                "short": {"type": "string", "minLength": 2, "maxLength": 3},
            },
        },
        valid=[
            {"day": "2024-01-31"},
            {"day": "1999-12-01", "clock": "23:59:59Z", "uid": "123e4567-e89b-12d3-a456-426614174000"},
            {"clock": "00:00:00.5+01:00", "email": "first.last+tag@mail.example.org", "short": "ab"},
            {"short": "日本語"},
            {"short": "a\\"},
            {"short": "😀😀"},
        ],
        valid_texts=['{"short": "\\u0061\\u0062"}', '{"short": "\\u00e9\\t"}'],
        invalid=[
            '{"day": "2024-1-31"}',
            '{"day": "2024-00-10"}',
            '{"day": "2024-01-32"}',
            '{"clock": "24:00:00Z"}',
            '{"clock": "12:00:00"}',
            '{"uid": "123e4567e89b12d3a456426614174000"}',
            '{"email": "anything goes"}',
            '{"day": "2023-02-29"}',
            '{"short": "a"}',
            '{"short": "abcd"}',
            '{"short": "\\ud83d\\ude00"}',  # one character (a surrogate pair) is too short
        ],
    ),
    Family(
        "any-value",
        {},
        valid=[None, 0, -1.5e-7, "s", [1, [2, [3]]], {"a": {"b": {"c": []}}}, True],
        invalid=["", "nul", "01", "1.", ".5", "+1", "[1,]", "{'a': 1}", '"\t"', "NaN", "[1] [2]"],
    ),
]


def _id(family: Family) -> str:
    return family.name


@pytest.fixture(scope="module")
def family_grammars() -> dict[str, str]:
    return {f.name: json_schema_to_gbnf(f.schema) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES, ids=_id)
def _format_checker() -> jsonschema.FormatChecker:
    """Assert the formats the converter enforces (and only those), strictly per RFC 3339."""
    checker = jsonschema.FormatChecker(["date", "uuid", "ipv4", "email", "idn-email"])
    time_re = r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"

    @checker.checks("time")
    def _time(value: object) -> bool:
        return not isinstance(value, str) or re.fullmatch(time_re, value) is not None

    @checker.checks("date-time")
    def _date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        date, sep, clock = value.partition("T")
        return bool(sep) and checker.conforms(date, "date") and _time(clock)

    return checker


def _strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not JSON", text, 0)

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("family", FAMILIES, ids=_id)
def test_family_instances_are_right_per_jsonschema(family: Family) -> None:
    """The fixtures themselves: valid and narrowed texts validate, invalid ones do not."""
    checker = jsonschema.Draft202012Validator(family.schema, format_checker=_format_checker())
    for text in family.valid + family.narrowed:
        errors = list(checker.iter_errors(_strict_json(text)))
        assert not errors, (text, errors)
    for text in family.invalid:
        try:
            value = _strict_json(text)
        except json.JSONDecodeError:
            continue
        assert not checker.is_valid(value), text


@pytest.mark.parametrize("family", FAMILIES, ids=_id)
def test_family_grammar_parses_in_llama(
    family: Family, family_grammars: dict[str, str], vocab_model: Any
) -> None:
    grammar = family_grammars[family.name]
    assert validate_grammar(grammar) == grammar
    assert llama_parses(vocab_model, grammar), grammar


@pytest.mark.parametrize("family", FAMILIES, ids=_id)
def test_family_grammar_accepts_valid_rejects_invalid(
    family: Family, family_grammars: dict[str, str]
) -> None:
    matcher = GbnfMatcher(family_grammars[family.name])
    problems = check_instances(matcher, family.valid, family.invalid + family.narrowed)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("family", FAMILIES, ids=_id)
def test_family_llama_matcher_agrees(
    family: Family, family_grammars: dict[str, str], llama_oracle: LlamaOracle | str
) -> None:
    oracle = require_oracle(llama_oracle)
    grammar = family_grammars[family.name]
    texts = family.valid + family.invalid + family.narrowed
    expected = [True] * len(family.valid) + [False] * (len(texts) - len(family.valid))
    verdicts = oracle.matches_all(grammar, texts)
    wrong = [(t, v) for t, v, e in zip(texts, verdicts, expected) if v != e]
    assert not wrong, wrong


def test_instance_counts_are_substantial() -> None:
    total = sum(len(f.valid) + len(f.invalid) + len(f.narrowed) for f in FAMILIES)
    assert total >= 200
    assert all(len(f.valid) + len(f.invalid) >= 9 for f in FAMILIES)


# ---------------------------------------------------------------------------
# Numeric ranges, checked exhaustively near the bounds and at random
# ---------------------------------------------------------------------------

INT_RANGES: list[dict[str, Any]] = [
    {"minimum": 0, "maximum": 150},
    {"minimum": -20, "maximum": 7},
    {"minimum": -1000, "maximum": -995},
    {"minimum": 7},
    {"maximum": -3},
    {"maximum": 12},
    {"minimum": 99, "maximum": 1001},
    {"exclusiveMinimum": 0},
    {"exclusiveMinimum": -5, "exclusiveMaximum": 5},
    {"minimum": 2.5, "maximum": 7.5},
    {"minimum": 5, "exclusiveMinimum": True, "maximum": 10, "exclusiveMaximum": True},
    {"minimum": 123456789, "maximum": 123456800},
]

NUM_RANGES: list[dict[str, Any]] = [
    {"minimum": 0, "maximum": 1},
    {"minimum": -1.5, "maximum": 2.25},
    {"exclusiveMinimum": 0},
    {"exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"minimum": 0.125},
    {"maximum": -0.5},
    {"exclusiveMaximum": 3},
    {"minimum": -10, "exclusiveMaximum": -9.99},
    {"minimum": 0.1, "maximum": 0.1},
    {"minimum": 19.5, "maximum": 205.75},
]


def _bounds(spec: dict[str, Any]) -> tuple[Decimal | None, bool, Decimal | None, bool]:
    lo = Decimal(str(spec["minimum"])) if "minimum" in spec else None
    hi = Decimal(str(spec["maximum"])) if "maximum" in spec else None
    lo_strict = spec.get("exclusiveMinimum") is True
    hi_strict = spec.get("exclusiveMaximum") is True
    if not isinstance(spec.get("exclusiveMinimum", True), bool):
        lo, lo_strict = Decimal(str(spec["exclusiveMinimum"])), True
    if not isinstance(spec.get("exclusiveMaximum", True), bool):
        hi, hi_strict = Decimal(str(spec["exclusiveMaximum"])), True
    return lo, lo_strict, hi, hi_strict


def _in_range(value: Decimal, spec: dict[str, Any]) -> bool:
    lo, lo_strict, hi, hi_strict = _bounds(spec)
    if lo is not None and (value < lo or (lo_strict and value == lo)):
        return False
    if hi is not None and (value > hi or (hi_strict and value == hi)):
        return False
    return True


def _int_candidates(spec: dict[str, Any], rng: random.Random) -> list[str]:
    lo, _, hi, _ = _bounds(spec)
    centres = [int(b) for b in (lo, hi) if b is not None] + [0]
    values = {c + d for c in centres for d in range(-12, 13)}
    values |= {rng.randint(-10**6, 10**6) for _ in range(40)}
    values |= {rng.randint(-10**12, 10**12) for _ in range(10)}
    texts = [str(v) for v in sorted(values)]
    return texts + ["-0", "00", "01", "1.0", "1e2", "+1", "- 1", ""]


def _num_candidates(spec: dict[str, Any], rng: random.Random) -> list[str]:
    lo, _, hi, _ = _bounds(spec)
    centres = [b for b in (lo, hi) if b is not None] + [Decimal(0), Decimal(1)]
    values: set[Decimal] = set()
    for c in centres:
        for step in ("1", "0.1", "0.01", "0.001", "0.0000001"):
            for k in range(-3, 4):
                values.add(c + k * Decimal(step))
    for _ in range(60):
        values.add(Decimal(rng.randint(-300000, 300000)) / Decimal(rng.choice([1, 10, 100, 1000, 8])))
    texts = set()
    for v in values:
        text = format(v, "f")
        texts.add(text)
        if "." in text:
            texts.add(text.rstrip("0").rstrip("."))
            texts.add(text + "000")
    extras = ["-0", "-0.0", "0.000", "1.", ".5", "1e0", "-1E-1", "00.5", "0.1000000000000000001",
              "1.0000000000000000"]
    return sorted(texts) + extras


def _expected_number(text: str, spec: dict[str, Any], integer: bool) -> bool:
    pattern = r"-?(0|[1-9][0-9]{0,18})" if integer else r"-?(0|[1-9][0-9]{0,18})(\.[0-9]{1,16})?"
    if not re.fullmatch(pattern, text):
        return False
    value = Decimal(text)
    if text.startswith("-") and value == 0:
        # "-0" comes only from the negative branch, present when the range
        # reaches below zero.
        lo = _bounds(spec)[0]
        if lo is not None and lo >= 0:
            return False
    return _in_range(value, spec)


@pytest.mark.parametrize("spec", INT_RANGES, ids=lambda s: json.dumps(s))
def test_integer_ranges_exact(spec: dict[str, Any], vocab_model: Any) -> None:
    grammar = json_schema_to_gbnf({"type": "integer", **spec})
    assert llama_parses(vocab_model, grammar)
    matcher = GbnfMatcher(grammar)
    texts = _int_candidates(spec, random.Random(json.dumps(spec)))
    wrong = [t for t in texts if matcher.matches(t) != _expected_number(t, spec, True)]
    assert not wrong, (grammar, wrong)
    assert any(_expected_number(t, spec, True) for t in texts)


@pytest.mark.parametrize("spec", NUM_RANGES, ids=lambda s: json.dumps(s))
def test_number_ranges_exact(spec: dict[str, Any], vocab_model: Any) -> None:
    grammar = json_schema_to_gbnf({"type": "number", **spec})
    assert llama_parses(vocab_model, grammar)
    matcher = GbnfMatcher(grammar)
    texts = _num_candidates(spec, random.Random(json.dumps(spec)))
    wrong = [t for t in texts if matcher.matches(t) != _expected_number(t, spec, False)]
    assert not wrong, (grammar, wrong)
    assert sum(_expected_number(t, spec, False) for t in texts) >= 2


def test_numeric_ranges_llama_agrees(llama_oracle: LlamaOracle | str) -> None:
    oracle = require_oracle(llama_oracle)
    for integer, specs in ((True, INT_RANGES), (False, NUM_RANGES)):
        for spec in specs:
            grammar = json_schema_to_gbnf({"type": "integer" if integer else "number", **spec})
            rng = random.Random(json.dumps(spec))
            texts = _int_candidates(spec, rng) if integer else _num_candidates(spec, rng)
            verdicts = oracle.matches_all(grammar, texts)
            wrong = [t for t, v in zip(texts, verdicts) if v != _expected_number(t, spec, integer)]
            assert not wrong, (spec, wrong)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "integer", "minimum": 5, "maximum": 4},
        {"type": "integer", "minimum": 4.2, "maximum": 4.8},
        {"type": "number", "exclusiveMinimum": 1, "maximum": 1},
    ],
)
def test_empty_numeric_range_is_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(GrammarError, match="admits no value"):
        json_schema_to_gbnf(spec)


@pytest.mark.parametrize("bad", [{"minimum": "1"}, {"maximum": True}, {"minimum": float("inf")}])
def test_bad_numeric_bound_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(GrammarError, match="must be"):
        json_schema_to_gbnf({"type": "number", **bad})


# ---------------------------------------------------------------------------
# Generic JSON grammars
# ---------------------------------------------------------------------------


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-10**9, 10**9)
    if kind == "float":
        return round(rng.uniform(-1e4, 1e4), rng.randint(0, 6)) * rng.choice([1, 1e-9, 1e12])
    if kind == "str":
        alphabet = 'ab "\\/\n\té日😀\u0001'
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}{rng.choice('xy')}": random_json(rng, depth + 1) for i in range(rng.randint(0, 3))}


def _json_texts(rng: random.Random, count: int, objects_only: bool) -> list[str]:
    texts = []
    while len(texts) < count:
        value = random_json(rng)
        if objects_only and not isinstance(value, dict):
            value = {"v": value}
        texts.append(json.dumps(value))  # ensure_ascii: \u escapes
        texts.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")))
        texts.append(json.dumps(value, ensure_ascii=False, indent=1))
    return texts


def _corruptions(rng: random.Random, texts: list[str], count: int) -> list[str]:
    out = []
    while len(out) < count:
        text = rng.choice(texts)
        if not text:
            continue
        pos = rng.randrange(len(text))
        mutant = text[:pos] + rng.choice(["", ",", "}", "]", '"', "x", ":"]) + text[pos + 1 :]
        try:
            json.loads(mutant)
        except json.JSONDecodeError:
            out.append(mutant)
    return out


def test_json_value_grammar_accepts_random_json_and_rejects_broken(vocab_model: Any) -> None:
    grammar = json_value_grammar()
    assert llama_parses(vocab_model, grammar)
    matcher = GbnfMatcher(grammar)
    rng = random.Random(7)
    valid = _json_texts(rng, 60, objects_only=False)
    invalid = _corruptions(rng, valid, 40)
    assert not check_instances(matcher, valid, invalid)


def test_json_object_grammar(vocab_model: Any) -> None:
    assert llama_parses(vocab_model, JSON_OBJECT_GBNF)
    matcher = GbnfMatcher(JSON_OBJECT_GBNF)
    rng = random.Random(8)
    valid = _json_texts(rng, 40, objects_only=True)
    not_objects = ["[]", "1", '"s"', "null", "true", "[{}]"]
    invalid = _corruptions(rng, valid, 30) + not_objects
    assert not check_instances(matcher, valid, invalid)


def test_generic_json_llama_agrees(llama_oracle: LlamaOracle | str) -> None:
    oracle = require_oracle(llama_oracle)
    rng = random.Random(9)
    valid = _json_texts(rng, 30, objects_only=True)
    invalid = _corruptions(rng, valid, 30) + ["[]", "1"]
    assert all(oracle.matches_all(JSON_OBJECT_GBNF, valid))
    assert not any(oracle.matches_all(JSON_OBJECT_GBNF, invalid))


def test_whitespace_is_bounded() -> None:
    matcher = GbnfMatcher(JSON_OBJECT_GBNF)
    assert matcher.matches('{\n' + " " * 20 + '"a": 1}')
    assert not matcher.matches('{\n' + " " * 21 + '"a": 1}')
    assert not matcher.matches('{\n\n"a": 1}')
    assert not matcher.matches('{  "a": 1}')


# ---------------------------------------------------------------------------
# Unsupported and malformed schemas
# ---------------------------------------------------------------------------

UNSUPPORTED = [
    {"type": "string", "pattern": "^a+$"},
    {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    {"type": "integer", "multipleOf": 3},
    {"not": {"type": "string"}},
    {"if": {"type": "string"}, "then": {"minLength": 2}},
    {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    {"type": "object", "minProperties": 1},
    {"type": "object", "propertyNames": {"maxLength": 3}},
    {"type": "array", "contains": {"type": "integer"}},
    {"type": "object", "properties": {"deep": {"type": "string", "pattern": "x"}}},
]


@pytest.mark.parametrize("schema", UNSUPPORTED, ids=lambda s: json.dumps(s)[:40])
def test_unsupported_keywords_raise_unless_lenient(schema: dict[str, Any], vocab_model: Any) -> None:
    with pytest.raises(GrammarError, match="cannot be enforced"):
        json_schema_to_gbnf(schema)
    loose = json_schema_to_gbnf(schema, strict=False)
    assert llama_parses(vocab_model, loose)


MALFORMED = [
    (False, "no value can match"),
    ({"type": "strng"}, "not a JSON type"),
    ({"type": []}, "non-empty list"),
    ({"enum": []}, "non-empty list"),
    ({"type": "string", "enum": [1, 2]}, "no 'enum' value"),
    ({"$ref": "https://example.com/schema.json"}, "only local"),
    ({"$ref": "#/$defs/missing"}, "points at nothing"),
    ({"$ref": "$defs/x"}, "only local"),
    ({"anyOf": []}, "non-empty list"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "different values of 'type'"),
    ({"type": "string", "minLength": -1}, "non-negative integer"),
    ({"type": "string", "minLength": 4, "maxLength": 2}, "maxLength below minLength"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "maxItems below minItems"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "needs 2 items"),
    ({"type": "object", "properties": []}, "'properties'"),
    ({"type": "object", "required": "a"}, "'required'"),
    ({"minLength": 1, "minimum": 2}, "explicit 'type'"),
    ({"const": float("nan")}, "not JSON"),
    ("string", "must be a JSON object"),
    ({"type": "string", "minLength": 5000}, "too large"),
    ({"properties": {"a": 5}}, "must be an object or a bool"),
]


@pytest.mark.parametrize(("schema", "message"), MALFORMED, ids=lambda x: str(x)[:30])
def test_malformed_schemas_raise_grammar_error(schema: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        json_schema_to_gbnf(schema)


def test_grammar_error_is_an_invalid_input_error() -> None:
    with pytest.raises(InvalidInputError):
        json_schema_to_gbnf({"type": "nope"})


def test_oversized_schema_hits_the_grammar_bounds() -> None:
    with pytest.raises(GrammarError, match="alternation"):
        json_schema_to_gbnf({"enum": list(range(5000))})
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    with pytest.raises(GrammarError, match="bytes"):
        json_schema_to_gbnf(big)


def test_large_max_bounds_are_dropped_not_exploded(vocab_model: Any) -> None:
    grammar = json_schema_to_gbnf(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000},
                                          "a": {"type": "array", "maxItems": 5000}}}
    )
    assert "100000" not in grammar and "5000" not in grammar
    assert llama_parses(vocab_model, grammar)


def test_annotations_and_unknown_keywords_are_ignored() -> None:
    plain = json_schema_to_gbnf({"type": "string"})
    annotated = json_schema_to_gbnf(
        {"type": "string", "title": "T", "description": "d", "default": "x", "examples": ["y"],
         "$schema": "https://json-schema.org/draft/2020-12/schema", "x-vendor": 1, "deprecated": True}
    )
    assert plain == annotated


def test_rule_names_are_llama_safe(vocab_model: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"snake_case key": {"type": "string"}, "ws": {"type": "integer"},
                       "日本": {"type": "boolean"}, "json-string": {"type": "null"}, "": {}},
        "$defs": {"my_def": {"type": "integer"}},
    }
    schema["properties"]["ref"] = {"$ref": "#/$defs/my_def"}
    grammar = json_schema_to_gbnf(schema)
    assert llama_parses(vocab_model, grammar)
    matcher = GbnfMatcher(grammar)
    assert matcher.matches('{"snake_case key": "a", "ws": 1, "日本": true, "json-string": null, "": [1], "ref": 3}')
    assert matcher.matches("{}")


def test_nullable_openapi_extension() -> None:
    matcher = GbnfMatcher(json_schema_to_gbnf({"type": "integer", "nullable": True}))
    assert matcher.matches("null") and matcher.matches("-3")
    assert not matcher.matches('"x"') and not matcher.matches("1.5")


def test_all_of_keeps_additional_properties_false_semantics(vocab_model: Any) -> None:
    # additionalProperties: false sees only the properties declared beside it.
    schema = {
        "allOf": [
            {"properties": {"a": {}, "b": {}}, "additionalProperties": False},
            {"properties": {"a": {"type": "integer"}, "c": {}}, "required": ["a"]},
        ]
    }
    grammar = json_schema_to_gbnf(schema)
    assert llama_parses(vocab_model, grammar)
    matcher = GbnfMatcher(grammar)
    validator = jsonschema.Draft202012Validator(schema)
    for text, ok in [('{"a": 1}', True), ('{"a": 1, "b": "x"}', True), ('{"a": "1"}', False),
                     ('{"a": 1, "c": 2}', False), ('{"b": 1}', False)]:
        assert matcher.matches(text) is ok, text
        assert validator.is_valid(json.loads(text)) is ok, text
    with pytest.raises(GrammarError, match="forbids: no value matches"):
        json_schema_to_gbnf({"allOf": [{"properties": {"x": {}}, "required": ["x"]}],
                             "additionalProperties": False})


def test_schema_true_and_empty_mean_any_value() -> None:
    assert json_schema_to_gbnf(True) == json_value_grammar()
    assert json_schema_to_gbnf({}) == json_value_grammar()


def test_conversion_is_deterministic() -> None:
    assert json_schema_to_gbnf(PYDANTIC_LIKE) == json_schema_to_gbnf(PYDANTIC_LIKE)


# ---------------------------------------------------------------------------
# response_format
# ---------------------------------------------------------------------------


def test_response_format_text_and_none() -> None:
    assert response_format_to_grammar(None) is None
    assert response_format_to_grammar({"type": "text"}) is None


def test_response_format_json_object() -> None:
    assert response_format_to_grammar({"type": "json_object"}) == JSON_OBJECT_GBNF
    with_schema = response_format_to_grammar({"type": "json_object", "schema": PERSON})
    assert with_schema == json_schema_to_gbnf(PERSON)


def test_response_format_json_schema() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert response_format_to_grammar(fmt) == json_schema_to_gbnf(PERSON)
    no_name = {"type": "json_schema", "json_schema": {"schema": PERSON}}
    assert response_format_to_grammar(no_name) == json_schema_to_gbnf(PERSON)


def test_response_format_strict_flag_controls_unsupported_keywords() -> None:
    schema = {"type": "string", "pattern": "^[a-z]+$"}
    with pytest.raises(GrammarError):
        response_format_to_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    loose = response_format_to_grammar(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": False}}
    )
    assert loose == json_schema_to_gbnf({"type": "string"})


@pytest.mark.parametrize(
    "fmt",
    [
        "json_object",
        ["json_object"],
        {},
        {"type": "yaml"},
        {"type": None},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "person"},
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "string"}},
        {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
        {"type": "json_object", "schema": 5},
    ],
    ids=repr,
)
def test_response_format_bad_shapes(fmt: Any) -> None:
    with pytest.raises(InvalidInputError):
        response_format_to_grammar(fmt)
