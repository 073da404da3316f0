"""Tests of xybrid.tool_calls: the streaming tool-call / thinking parser, tool
validation, the tool-call grammar and the system-prompt fallback."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from gbnf_matcher import GbnfMatcher, LlamaOracle, build_llama_oracle

from xybrid.errors import GrammarError, InvalidInputError
from xybrid.tool_calls import (
    TOOL_CALL_FORMATS,
    Event,
    MalformedToolCallEvent,
    ParsedReply,
    TextEvent,
    ThinkingEvent,
    ToolCallEvent,
    ToolCallParser,
    ToolSpec,
    parse_tool_calls,
    tool_call_grammar,
    tools_to_system_prompt,
    validate_tools,
)

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def counter_ids() -> Any:
    numbers = itertools.count(1)
    return lambda: f"call_{next(numbers)}"


def coalesce(events: list[Event]) -> list[Event]:
    """Merge neighbouring text / thinking events (streaming may split them)."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, TextEvent) and isinstance(last, TextEvent):
            out[-1] = TextEvent(last.text + event.text)
        elif isinstance(event, ThinkingEvent) and isinstance(last, ThinkingEvent):
            out[-1] = ThinkingEvent(last.text + event.text)
        else:
            out.append(event)
    return out


def stream(fmt: str, chunks: list[str], **options: Any) -> list[Event]:
    parser = ToolCallParser(fmt, id_factory=counter_ids(), **options)
    events: list[Event] = []
    for chunk in chunks:
        got = parser.feed(chunk)
        assert all(not isinstance(e, (TextEvent, ThinkingEvent)) or e.text for e in got)
        events.extend(got)
    events.extend(parser.finish())
    return coalesce(events)


def T(text: str) -> TextEvent:
    return TextEvent(text)


def K(text: str) -> ThinkingEvent:
    return ThinkingEvent(text)


def C(n: int, name: str, arguments: dict[str, Any], raw: str) -> ToolCallEvent:
    return ToolCallEvent(f"call_{n}", name, json.dumps(arguments, separators=(",", ":"), ensure_ascii=False), raw)


def M(raw: str, error: str) -> tuple[str, str]:
    """Expected malformed event: raw text and an error-message fragment."""
    return (raw, error)


def assert_events(actual: list[Event], expected: list[Any]) -> None:
    assert len(actual) == len(expected), (actual, expected)
    for got, want in zip(actual, expected):
        if isinstance(want, tuple):
            assert isinstance(got, MalformedToolCallEvent), (got, want)
            assert got.raw == want[0]
            assert want[1] in got.error, (got.error, want[1])
        else:
            assert got == want


# ---------------------------------------------------------------------------
# Table tests per format
# ---------------------------------------------------------------------------

W_RAW = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
T_RAW = '<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>'

HERMES = [
    ("plain text", "Hello there.", [T("Hello there.")]),
    ("empty reply", "", []),
    ("one call", W_RAW, [C(1, "get_weather", {"city": "Paris"}, W_RAW)]),
    (
        "text around a call",
        "Let me check." + W_RAW + "Done.",
        [T("Let me check."), C(1, "get_weather", {"city": "Paris"}, W_RAW), T("Done.")],
    ),
    (
        "two calls",
        W_RAW + "\n" + T_RAW,
        [C(1, "get_weather", {"city": "Paris"}, W_RAW), T("\n"), C(2, "get_time", {"tz": "UTC"}, T_RAW)],
    ),
    (
        "arguments as a JSON string",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2], \\"b\\": null}"}</tool_call>',
        [C(1, "f", {"a": [1, 2], "b": None},
           '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2], \\"b\\": null}"}</tool_call>')],
    ),
    (
        "empty arguments string and missing arguments",
        '<tool_call>{"name": "f", "arguments": ""}</tool_call><tool_call>{"name": "g"}</tool_call>',
        [C(1, "f", {}, '<tool_call>{"name": "f", "arguments": ""}</tool_call>'),
         C(2, "g", {}, '<tool_call>{"name": "g"}</tool_call>')],
    ),
    (
        "parameters key and unicode",
        '<tool_call>{"name": "say", "parameters": {"text": "héllo 日本 😀"}}</tool_call>',
        [C(1, "say", {"text": "héllo 日本 😀"},
           '<tool_call>{"name": "say", "parameters": {"text": "héllo 日本 😀"}}</tool_call>')],
    ),
    (
        "OpenAI nested shape",
        '<tool_call>{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}</tool_call>',
        [C(1, "f", {"x": 1},
           '<tool_call>{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}</tool_call>')],
    ),
    (
        "list of calls in one block",
        '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}}]</tool_call>',
        [C(1, "a", {}, '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}}]</tool_call>'),
         C(2, "b", {"k": True}, '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"k": true}}]</tool_call>')],
    ),
    (
        "Qwen3-Coder function body",
        "<tool_call>\n<function=search>\n<parameter=query>\nbest pizza\n</parameter>\n"
        "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call>",
        [C(1, "search", {"query": "best pizza", "limit": 5},
           "<tool_call>\n<function=search>\n<parameter=query>\nbest pizza\n</parameter>\n"
           "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call>")],
    ),
    (
        "thinking then a call",
        "<think>\nThe user wants weather.\n</think>\n\n" + W_RAW,
        [K("\nThe user wants weather.\n"), T("\n\n"), C(1, "get_weather", {"city": "Paris"}, W_RAW)],
    ),
    (
        "a call tag inside thinking stays thinking",
        "<think>maybe <tool_call>x</tool_call>?</think>No.",
        [K("maybe <tool_call>x</tool_call>?"), T("No.")],
    ),
    (
        "thinking tag variant",
        "<thinking>hmm</thinking>ok",
        [K("hmm"), T("ok")],
    ),
    (
        "unclosed thinking is flushed as thinking",
        "<think>still going",
        [K("still going")],
    ),
    (
        "malformed JSON, then parsing goes on",
        "a<tool_call>{name: f}</tool_call>b" + T_RAW,
        [T("a"), M("<tool_call>{name: f}</tool_call>", "invalid JSON"), T("b"),
         C(1, "get_time", {"tz": "UTC"}, T_RAW)],
    ),
    (
        "unclosed call at the end",
        'x<tool_call>{"name": "f", "argu',
        [T("x"), M('<tool_call>{"name": "f", "argu', "ended inside <tool_call>")],
    ),
    (
        "arguments that are not an object",
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [M('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "must be a JSON object")],
    ),
    (
        "arguments string that is not JSON",
        '<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>',
        [M('<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>', "arguments string is not JSON")],
    ),
    (
        "no name",
        '<tool_call>{"arguments": {}}</tool_call>',
        [M('<tool_call>{"arguments": {}}</tool_call>', "no 'name'")],
    ),
    (
        "stray closing tag is text",
        "a </tool_call> b",
        [T("a </tool_call> b")],
    ),
    (
        "angle brackets that are not tags",
        "if a <b and c> d: <tool <tool_cal",
        [T("if a <b and c> d: <tool <tool_cal")],
    ),
    (
        "bare JSON is text in hermes",
        '{"name": "f", "arguments": {}}',
        [T('{"name": "f", "arguments": {}}')],
    ),
]

LLAMA3 = [
    (
        "bare call",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [C(1, "get_weather", {"city": "Paris"}, '{"name": "get_weather", "parameters": {"city": "Paris"}}')],
    ),
    (
        "bare call with leading whitespace and type key",
        '\n  {"type": "function", "name": "f", "parameters": {}}',
        [C(1, "f", {}, '{"type": "function", "name": "f", "parameters": {}}')],
    ),
    (
        "python tag with JSON",
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}<|eom_id|>',
        [C(1, "f", {"a": 1}, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}<|eom_id|>')],
    ),
    (
        "python tag to the end of the reply",
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
        [C(1, "f", {"a": 1}, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}')],
    ),
    (
        "python tag built-in tool",
        '<|python_tag|>brave_search.call(query="weather in Paris")',
        [C(1, "brave_search", {"query": "weather in Paris"},
           '<|python_tag|>brave_search.call(query="weather in Paris")')],
    ),
    (
        "two calls separated by a semicolon",
        '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": "y;z"}}',
        [C(1, "a", {}, '{"name": "a", "parameters": {}}'),
         C(2, "b", {"x": "y;z"}, '{"name": "b", "parameters": {"x": "y;z"}}')],
    ),
    (
        "a JSON answer is text",
        '{"answer": 42, "unit": "m"}',
        [T('{"answer": 42, "unit": "m"}')],
    ),
    (
        "text reply",
        "The weather is fine.",
        [T("The weather is fine.")],
    ),
    (
        "text after a call",
        '{"name": "f", "parameters": {}} and more',
        [C(1, "f", {}, '{"name": "f", "parameters": {}}'), T(" and more")],
    ),
    (
        "truncated call",
        '{"name": "f", "parameters": {"a": ',
        [M('{"name": "f", "parameters": {"a": ', "ended inside a JSON tool call")],
    ),
    (
        "braces inside strings do not confuse the scanner",
        '{"name": "f", "parameters": {"s": "}{]\\"["}}',
        [C(1, "f", {"s": '}{]"['}, '{"name": "f", "parameters": {"s": "}{]\\"["}}')],
    ),
    (
        "python tag with garbage",
        "<|python_tag|>not a call at all",
        [M("<|python_tag|>not a call at all", "not a Python call")],
    ),
]

GEMMA = [
    (
        "tool_code block",
        'Checking.\n```tool_code\nget_weather(city="Paris", days=3, metric=True)\n```\n',
        [T("Checking.\n"),
         C(1, "get_weather", {"city": "Paris", "days": 3, "metric": True},
           '```tool_code\nget_weather(city="Paris", days=3, metric=True)\n```'),
         T("\n")],
    ),
    (
        "tool_code with two calls and literals",
        "```tool_code\na(x=[1, -2.5, None], y={'k': (1, 2)})\nb()\n```",
        [C(1, "a", {"x": [1, -2.5, None], "y": {"k": [1, 2]}}, "```tool_code\na(x=[1, -2.5, None], y={'k': (1, 2)})\nb()\n```"),
         C(2, "b", {}, "```tool_code\na(x=[1, -2.5, None], y={'k': (1, 2)})\nb()\n```")],
    ),
    (
        "tool_code with positional arguments",
        '```tool_code\nf("x")\n```',
        [M('```tool_code\nf("x")\n```', "positional")],
    ),
    (
        "tool_code never evaluates code",
        "```tool_code\nf(x=__import__('os').getcwd())\n```",
        [M("```tool_code\nf(x=__import__('os').getcwd())\n```", "unsupported expression")],
    ),
    (
        "json fence with a call",
        'Here:\n```json\n{"name": "f", "arguments": {"a": 1}}\n```',
        [T("Here:\n"), C(1, "f", {"a": 1}, '```json\n{"name": "f", "arguments": {"a": 1}}\n```')],
    ),
    (
        "json fence that is an answer stays text",
        'Result:\n```json\n{"total": 3}\n```\nbye',
        [T('Result:\n```json\n{"total": 3}\n```\nbye')],
    ),
    (
        "unclosed json fence is text",
        '```json\n{"name": "f", "arg',
        [T('```json\n{"name": "f", "arg')],
    ),
    (
        "bare JSON list of calls",
        '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
        [C(1, "a", {"x": 1}, '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'),
         C(2, "b", {}, '[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]')],
    ),
    (
        "pythonic list",
        "[get_weather(city='Paris'), get_time(tz=\"UTC\")]",
        [C(1, "get_weather", {"city": "Paris"}, "[get_weather(city='Paris'), get_time(tz=\"UTC\")]"),
         C(2, "get_time", {"tz": "UTC"}, "[get_weather(city='Paris'), get_time(tz=\"UTC\")]")],
    ),
    (
        "text that starts with a bracket",
        "[Note] it's fine",
        [T("[Note] it's fine")],
    ),
    (
        "a JSON list answer is text",
        '["a", "b"]',
        [T('["a", "b"]')],
    ),
]

GEMMA4_RAW = '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:3,opts:{metric:true,tags:[<|"|>a<|"|>,2]}}<tool_call|>'
GEMMA4 = [
    (
        "thought and a call",
        "<|channel>thought\nNeed weather.<channel|>" + GEMMA4_RAW,
        [K("\nNeed weather."),
         C(1, "get_weather", {"city": "Paris, FR", "days": 3, "opts": {"metric": True, "tags": ["a", 2]}}, GEMMA4_RAW)],
    ),
    (
        "two calls and text",
        "ok <|tool_call>call:a{}<tool_call|><|tool_call>call:b{x:null,y:-1.5}<tool_call|> end",
        [T("ok "), C(1, "a", {}, "<|tool_call>call:a{}<tool_call|>"),
         C(2, "b", {"x": None, "y": -1.5}, "<|tool_call>call:b{x:null,y:-1.5}<tool_call|>"), T(" end")],
    ),
    (
        "malformed arguments",
        "<|tool_call>call:a{x:<|\"|>open}<tool_call|>",
        [M("<|tool_call>call:a{x:<|\"|>open}<tool_call|>", "unterminated string")],
    ),
    (
        "missing call prefix",
        "<|tool_call>a{}<tool_call|>",
        [M("<|tool_call>a{}<tool_call|>", "call:NAME")],
    ),
]

FUNCTIONGEMMA = [
    (
        "escape-delimited strings",
        "<start_function_call>call:send{to:<escape>bob@x.org<escape>,body:<escape>Hi, {there}<escape>}<end_function_call>",
        [C(1, "send", {"to": "bob@x.org", "body": "Hi, {there}"},
           "<start_function_call>call:send{to:<escape>bob@x.org<escape>,body:<escape>Hi, {there}<escape>}<end_function_call>")],
    ),
    (
        "unclosed",
        "<start_function_call>call:send{",
        [M("<start_function_call>call:send{", "ended inside")],
    ),
]

AUTO = [(name, text, events) for name, text, events in HERMES if "bare JSON" not in name]
AUTO += [(name, text, events) for name, text, events in LLAMA3 if name != "truncated call"]
AUTO += GEMMA + GEMMA4 + FUNCTIONGEMMA
AUTO += [
    ("truncated bare JSON is text in auto", '{"name": "f", "par', [T('{"name": "f", "par')]),
]

TABLE = (
    [("hermes", *case) for case in HERMES]
    + [("llama3", *case) for case in LLAMA3]
    + [("gemma", *case) for case in GEMMA]
    + [("gemma4", *case) for case in GEMMA4]
    + [("functiongemma", *case) for case in FUNCTIONGEMMA]
    + [("auto", *case) for case in AUTO]
)


@pytest.mark.parametrize(("fmt", "name", "text", "expected"), TABLE, ids=[f"{c[0]}-{c[1]}" for c in TABLE])
def test_table(fmt: str, name: str, text: str, expected: list[Any]) -> None:
    assert_events(stream(fmt, [text]), expected)


@pytest.mark.parametrize(("fmt", "name", "text", "expected"), TABLE, ids=[f"{c[0]}-{c[1]}" for c in TABLE])
def test_table_char_by_char(fmt: str, name: str, text: str, expected: list[Any]) -> None:
    assert_events(stream(fmt, list(text)), expected)


def test_none_format_only_separates_thinking() -> None:
    text = "<think>x</think>" + W_RAW
    assert_events(stream("none", [text]), [K("x"), T(W_RAW)])


def test_format_specific_markers_are_text_elsewhere() -> None:
    assert_events(stream("gemma4", [W_RAW]), [T(W_RAW)])
    assert_events(stream("hermes", ["```tool_code\nf()\n```"]), [T("```tool_code\nf()\n```")])
    assert_events(stream("functiongemma", [GEMMA4_RAW]), [T(GEMMA4_RAW)])


def test_starts_in_think() -> None:
    events = stream("hermes", ["The user asks.</think>\n\nAnswer."], starts_in_think=True)
    assert_events(events, [K("The user asks."), T("\n\nAnswer.")])


def test_tool_names_filter() -> None:
    events = stream("hermes", [W_RAW + T_RAW], tool_names=["get_time"])
    assert_events(events, [M(W_RAW, "unknown tool 'get_weather'"), C(1, "get_time", {"tz": "UTC"}, T_RAW)])
    bare = '{"name": "delete_all", "arguments": {}}'
    assert_events(stream("auto", [bare], tool_names=["get_time"]), [T(bare)])
    fence = '```json\n{"name": "delete_all", "arguments": {}}\n```'
    assert_events(stream("gemma", [fence], tool_names=["get_time"]), [T(fence)])


# ---------------------------------------------------------------------------
# Chunk boundaries at every position
# ---------------------------------------------------------------------------

SPLIT_FIXTURES = [
    ("hermes", "<think>plan a</think>Intro " + W_RAW + "\nmid " + T_RAW + " outro"),
    ("auto", "<think>plan</think>\n" + W_RAW + "<|tool_call>call:a{x:<|\"|>y<|\"|>}<tool_call|>tail"),
    ("llama3", '  {"name": "a", "parameters": {"s": "}"}}; {"name": "b", "parameters": {}} bye'),
    ("gemma", 'Text.\n```tool_code\nf(a=1)\n```\n```json\n{"k": 1}\n```'),
    ("gemma4", "<|channel>thought\nx<channel|>" + GEMMA4_RAW),
    ("functiongemma", "a<start_function_call>call:f{s:<escape>q<escape>}<end_function_call>b"),
    ("hermes", "x<tool_call>{oops}</tool_call>y<tool_call>{\"name\""),
]


@pytest.mark.parametrize(("fmt", "text"), SPLIT_FIXTURES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SPLIT_FIXTURES)])
def test_every_split_position_gives_the_same_events(fmt: str, text: str) -> None:
    whole = stream(fmt, [text])
    assert whole, "fixture must produce events"
    for cut in range(len(text) + 1):
        assert stream(fmt, [text[:cut], text[cut:]]) == whole, cut


@pytest.mark.parametrize(("fmt", "text"), SPLIT_FIXTURES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(SPLIT_FIXTURES)])
def test_random_multi_splits_give_the_same_events(fmt: str, text: str) -> None:
    whole = stream(fmt, [text])
    rng = random.Random(text)
    for _ in range(60):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(1, 8)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert stream(fmt, pieces) == whole, pieces


def test_text_is_released_promptly() -> None:
    parser = ToolCallParser("hermes")
    assert parser.feed("Hello") == [T("Hello")]
    assert parser.feed(" wor") == [T(" wor")]
    assert parser.feed("ld <tool") == [T("ld ")]  # "<tool" may start a tag
    assert parser.feed("bar>") == [T("<toolbar>")]
    assert parser.feed("<think>ab") == [K("ab")]
    assert parser.feed("c</thi") == [K("c")]
    assert parser.feed("nk>") == []
    assert parser.feed("<tool_call>{") == []  # a call is released whole
    assert parser.finish() == [MalformedToolCallEvent("<tool_call>{", parser_error("<tool_call>"))]


def parser_error(opener: str) -> str:
    closer = {"<tool_call>": "</tool_call>"}[opener]
    return f"the reply ended inside {opener} without {closer}"


def test_parser_is_reusable_after_finish() -> None:
    parser = ToolCallParser("auto", id_factory=counter_ids())
    parser.feed("<think>a")
    parser.finish()
    assert coalesce(parser.feed("b") + parser.finish()) == [T("b")]


def test_leading_whitespace_is_kept_for_text_and_dropped_before_bare_calls() -> None:
    assert stream("auto", ["\n  Hi"]) == [T("\n  Hi")]
    assert stream("auto", ["   "]) == [T("   ")]
    bare = '{"name": "f", "arguments": {}}'
    assert stream("auto", ["\n ", bare]) == [C(1, "f", {}, bare)]


def test_default_ids_are_unique_openai_style() -> None:
    parser = ToolCallParser("hermes")
    events = parser.feed(W_RAW * 20) + parser.finish()
    ids = [e.id for e in events if isinstance(e, ToolCallEvent)]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)


def test_event_helpers() -> None:
    call = C(1, "get_weather", {"city": "Paris"}, W_RAW)
    assert call.parsed_arguments == {"city": "Paris"}
    assert call.to_openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    with pytest.raises(AttributeError):
        call.name = "x"  # type: ignore[misc]


def test_parse_tool_calls_non_streaming() -> None:
    reply = parse_tool_calls(
        "<think> hmm </think>\nSure. " + W_RAW + " " + "<tool_call>{bad}</tool_call>",
        format="hermes",
        id_factory=counter_ids(),
    )
    assert isinstance(reply, ParsedReply)
    assert reply.thinking == "hmm"
    assert reply.text == "Sure."
    assert reply.tool_calls == (C(1, "get_weather", {"city": "Paris"}, W_RAW),)
    assert len(reply.malformed) == 1 and reply.malformed[0].raw == "<tool_call>{bad}</tool_call>"
    assert parse_tool_calls("plain") == ParsedReply("plain", "", (), ())


@pytest.mark.parametrize("fmt", ["", "Hermes", "openai", None, 3])
def test_bad_format_rejected(fmt: Any) -> None:
    with pytest.raises(InvalidInputError, match="format must be one of"):
        ToolCallParser(fmt)


def test_bad_inputs_rejected() -> None:
    parser = ToolCallParser()
    with pytest.raises(InvalidInputError):
        parser.feed(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        parse_tool_calls(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        ToolCallParser(starts_in_think="yes")  # type: ignore[arg-type]
    assert set(TOOL_CALL_FORMATS) == {"auto", "hermes", "llama3", "gemma", "gemma4", "functiongemma", "none"}


# ---------------------------------------------------------------------------
# Tool validation
# ---------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
SEARCH = {
    "type": "function",
    "function": {
        "name": "web.search",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}, "filters": {"$ref": "#/$defs/filters"}},
            "required": ["q"],
            "$defs": {"filters": {"type": "object", "properties": {"site": {"type": "string"}},
                                  "additionalProperties": False}},
        },
    },
}
TOOLS = [WEATHER, CLOCK, SEARCH]


def test_validate_tools() -> None:
    specs = validate_tools(TOOLS)
    assert [s.name for s in specs] == ["get_weather", "get_time", "web.search"]
    assert specs[0].description == "Current weather for a city."
    assert specs[1] == ToolSpec("get_time", None, None)
    assert specs[0].to_openai() == WEATHER
    flat = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    assert validate_tools([flat]) == (ToolSpec("f", None, {"type": "object"}),)
    assert validate_tools([]) == ()


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ("get_weather", "must be a list"),
        ({"type": "function"}, "must be a list"),
        ([5], "must be an object"),
        ([{"function": {"name": "f"}}], "type must be 'function'"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "type must be 'function'"),
        ([{"type": "function"}], "must be an object with a 'name'"),
        ([{"type": "function", "function": "f"}], "must be an object with a 'name'"),
        ([{"type": "function", "function": {"description": "x"}}], "name must be"),
        ([{"type": "function", "function": {"name": "has space"}}], "name must be"),
        ([{"type": "function", "function": {"name": "x" * 65}}], "name must be"),
        ([{"type": "function", "function": {"name": ""}}], "name must be"),
        ([CLOCK, CLOCK], "used twice"),
        ([{"type": "function", "function": {"name": "f", "description": 3}}], "description must be"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "JSON schema object"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "describe an object"),
    ],
)
def test_validate_tools_rejects_bad_shapes(tools: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        validate_tools(tools)


# ---------------------------------------------------------------------------
# Tool-call grammar
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_model(llama_cpp_dir: Path) -> Any:
    from xybrid._native._engine import Model

    return Model(str(llama_cpp_dir / "models" / "ggml-vocab-llama-spm.gguf"), vocab_only=True)


@pytest.fixture(scope="module")
def llama_oracle(llama_cpp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LlamaOracle | str:
    return build_llama_oracle(llama_cpp_dir, tmp_path_factory.getbasetemp() / "gbnf-oracle")


def llama_parses(model: Any, grammar: str) -> bool:
    from xybrid._native._engine import Sampler

    try:
        Sampler(model, grammar=grammar)
    except GrammarError:
        return False
    return True


def call_text(fmt: str, name: str, args: str) -> str:
    key = "parameters" if fmt == "llama3" else "arguments"
    body = f'{{"name": "{name}", "{key}": {args}}}'
    return f"<tool_call>\n{body}\n</tool_call>" if fmt == "hermes" else body


GOOD_CALLS = [
    ("get_weather", '{"city": "Paris"}', {"city": "Paris"}),
    ("get_weather", '{"city": "Oslo", "unit": "c", "days": 7}', {"city": "Oslo", "unit": "c", "days": 7}),
    ("get_time", "{}", {}),
    ("web.search", '{"q": "x", "filters": {"site": "a.org"}}', {"q": "x", "filters": {"site": "a.org"}}),
]
BAD_CALLS = [
    ("get_weather", "{}"),  # city is required
    ("get_weather", '{"city": ""}'),  # minLength
    ("get_weather", '{"city": "Oslo", "days": 8}'),  # maximum
    ("get_weather", '{"city": "Oslo", "unit": "k"}'),  # enum
    ("get_weather", '{"town": "Oslo"}'),
    ("get_time", '{"tz": "UTC"}'),  # no parameters declared
    ("web.search", '{"q": "x", "filters": {"page": 2}}'),
    ("launch_missiles", "{}"),
]


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "gemma"])
def test_tool_call_grammar_parses_in_llama(fmt: str, vocab_model: Any) -> None:
    for parallel in (True, False):
        assert llama_parses(vocab_model, tool_call_grammar(TOOLS, fmt, parallel=parallel))


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "gemma"])
def test_tool_call_grammar_accepts_valid_and_rejects_invalid(fmt: str) -> None:
    matcher = GbnfMatcher(tool_call_grammar(TOOLS, fmt))
    single = GbnfMatcher(tool_call_grammar(TOOLS, fmt, parallel=False))
    for name, args, parsed in GOOD_CALLS:
        text = call_text(fmt, name, args)
        assert matcher.matches(text), text
        assert single.matches(text), text
        # What the grammar lets through, the parser reads back.
        reply = parse_tool_calls(text, fmt, id_factory=counter_ids())
        assert [(c.name, c.parsed_arguments) for c in reply.tool_calls] == [(name, parsed)]
        assert reply.text == "" and not reply.malformed
    for name, args in BAD_CALLS:
        text = call_text(fmt, name, args)
        assert not matcher.matches(text), text
    wrong_key = call_text("llama3" if fmt != "llama3" else "hermes", "get_time", "{}")
    for text in [wrong_key, "Sure! " + call_text(fmt, "get_time", "{}"), call_text(fmt, "get_time", "{}") + " ok", ""]:
        assert not matcher.matches(text), text


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "gemma"])
def test_tool_call_grammar_parallel_calls(fmt: str) -> None:
    a = call_text(fmt, "get_time", "{}")
    b = call_text(fmt, "get_weather", '{"city": "Rome"}')
    several = {"hermes": f"{a}\n{b}", "llama3": f"{a}; {b}", "gemma": f"[{a}, {b}]"}[fmt]
    assert GbnfMatcher(tool_call_grammar(TOOLS, fmt)).matches(several)
    assert not GbnfMatcher(tool_call_grammar(TOOLS, fmt, parallel=False)).matches(several)
    reply = parse_tool_calls(several, fmt)
    assert [c.name for c in reply.tool_calls] == ["get_time", "get_weather"]


def test_tool_call_grammar_llama_agrees(llama_oracle: LlamaOracle | str) -> None:
    if isinstance(llama_oracle, str):
        pytest.skip(f"llama.cpp grammar oracle unavailable: {llama_oracle}")
    for fmt in ("hermes", "llama3", "gemma"):
        grammar = tool_call_grammar(TOOLS, fmt)
        good = [call_text(fmt, n, a) for n, a, _ in GOOD_CALLS]
        bad = [call_text(fmt, n, a) for n, a in BAD_CALLS]
        assert llama_oracle.matches_all(grammar, good) == [True] * len(good)
        assert llama_oracle.matches_all(grammar, bad) == [False] * len(bad)


def test_tool_call_grammar_errors() -> None:
    with pytest.raises(InvalidInputError, match="supports formats"):
        tool_call_grammar(TOOLS, "gemma4")
    with pytest.raises(InvalidInputError, match="supports formats"):
        tool_call_grammar(TOOLS, "auto")
    with pytest.raises(InvalidInputError, match="at least one tool"):
        tool_call_grammar([])
    with pytest.raises(InvalidInputError, match="must be a list"):
        tool_call_grammar("tools")
    pattern_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}}}
    with pytest.raises(GrammarError, match="cannot be enforced"):
        tool_call_grammar([pattern_tool])
    loose = GbnfMatcher(tool_call_grammar([pattern_tool], strict=False))
    assert loose.matches(call_text("hermes", "f", '{"s": "zzz"}'))


def test_tool_names_with_json_specials_are_escaped(vocab_model: Any) -> None:
    tools = [{"type": "function", "function": {"name": "a-b_c.d"}}]
    grammar = tool_call_grammar(tools, "llama3")
    assert llama_parses(vocab_model, grammar)
    assert GbnfMatcher(grammar).matches('{"name": "a-b_c.d", "parameters": {}}')


# ---------------------------------------------------------------------------
# System prompt fallback
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "gemma"])
def test_tools_to_system_prompt(fmt: str) -> None:
    prompt = tools_to_system_prompt(TOOLS, fmt)
    listed = prompt.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(line) for line in listed] == [s.to_openai() for s in validate_tools(TOOLS)]
    # The example call in the prompt is one the parser understands.
    example = prompt.rsplit("form:\n", 1)[-1] if fmt != "hermes" else prompt[prompt.index("<tool_call>\n{"):]
    reply = parse_tool_calls(example, fmt)
    assert [c.name for c in reply.tool_calls] == ["TOOL_NAME"]
    assert reply.tool_calls[0].parsed_arguments == {"ARGUMENT": "VALUE"}


def test_tools_to_system_prompt_errors() -> None:
    with pytest.raises(InvalidInputError):
        tools_to_system_prompt([])
    with pytest.raises(InvalidInputError):
        tools_to_system_prompt(TOOLS, "gemma4")
    with pytest.raises(InvalidInputError):
        tools_to_system_prompt([{"type": "function"}])
