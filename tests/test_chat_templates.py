"""Tests for xybrid.chat_templates: built-in formats, the double-format guard,
sandboxed Jinja rendering of real model templates, and template resolution."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from xybrid.chat_templates import (
    DEFAULT_CHAT_FORMAT,
    BuiltinChatTemplate,
    ChatFormat,
    JinjaChatTemplate,
    format_for_architecture,
    format_messages,
    is_preformatted,
    resolve_chat_template,
)
from xybrid.errors import InvalidInputError, UnsupportedInputError

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = REPO_ROOT / "llama.cpp" / "models" / "templates"


def read_template(name: str) -> str:
    """Source of a real chat template shipped with the pinned llama.cpp."""
    path = TEMPLATES_DIR / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: the pinned llama.cpp source is needed for these tests; "
            "fetch it with `python scripts/fetch_llama_cpp.py`"
        )
    return path.read_text(encoding="utf-8")


class Msg:
    """A duck-typed message: plain attributes, no relation to any xybrid class."""

    def __init__(self, role: object, content: Any) -> None:
        self.role = role
        self.content = content


class NoRole:
    """A message object that has content but no role attribute at all."""

    def __init__(self, content: str) -> None:
        self.content = content


@dataclass(frozen=True)
class DataMsg:
    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None


class Role(enum.Enum):
    USER = "user"
    ASSISTANT = "assistant"


class StrRole(str, enum.Enum):
    USER = "user"


def conv(*pairs: tuple[str, str]) -> list[Msg]:
    return [Msg(role, content) for role, content in pairs]


SYS = ("system", "You are a helpful assistant.")

# ---------------------------------------------------------------------------
# Built-in formatters: the reference test vectors
# ---------------------------------------------------------------------------

VECTORS = [
    pytest.param(
        ChatFormat.CHATML,
        [("user", "Hello!")],
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
        id="chatml-single",
    ),
    pytest.param(
        ChatFormat.CHATML,
        [SYS, ("user", "What is 2+2?")],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n",
        id="chatml-system-user",
    ),
    pytest.param(
        ChatFormat.CHATML,
        [
            SYS,
            ("user", "Hello!"),
            ("assistant", "Hi there! How can I help?"),
            ("user", "What's the weather?"),
            ("assistant", "I don't have weather data."),
            ("user", "Thanks anyway!"),
        ],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi there! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat's the weather?<|im_end|>\n"
        "<|im_start|>assistant\nI don't have weather data.<|im_end|>\n"
        "<|im_start|>user\nThanks anyway!<|im_end|>\n"
        "<|im_start|>assistant\n",
        id="chatml-multi-turn",
    ),
    pytest.param(
        ChatFormat.LLAMA2,
        [("user", "Hello!")],
        "[INST] Hello! [/INST] ",
        id="llama2-single",
    ),
    pytest.param(
        ChatFormat.LLAMA2,
        [SYS, ("user", "What is 2+2?")],
        "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST] ",
        id="llama2-system-user",
    ),
    pytest.param(
        ChatFormat.LLAMA2,
        [
            SYS,
            ("user", "Hello!"),
            ("assistant", "Hi there!"),
            ("user", "How are you?"),
            ("assistant", "I'm doing well!"),
            ("user", "Great!"),
        ],
        "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n"
        "Hello! [/INST] Hi there! </s><s>"
        "[INST] How are you? [/INST] I'm doing well! </s><s>"
        "[INST] Great! [/INST] ",
        id="llama2-multi-turn",
    ),
    pytest.param(
        ChatFormat.LLAMA2,
        [SYS],
        "[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n [/INST] ",
        id="llama2-system-only",
    ),
    pytest.param(
        ChatFormat.GEMMA,
        [("user", "Hello!")],
        "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
        id="gemma-single",
    ),
    pytest.param(
        ChatFormat.GEMMA,
        [SYS, ("user", "What is 2+2?")],
        "<start_of_turn>user\n[System Instructions]\nYou are a helpful assistant.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n",
        id="gemma-system-user",
    ),
    pytest.param(
        ChatFormat.GEMMA,
        [
            ("system", "You are helpful."),
            ("user", "Hello!"),
            ("assistant", "Hi there!"),
            ("user", "How are you?"),
        ],
        "<start_of_turn>user\n[System Instructions]\nYou are helpful.<end_of_turn>\n"
        "<start_of_turn>user\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi there!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n",
        id="gemma-multi-turn",
    ),
    pytest.param(
        ChatFormat.GEMMA,
        [("assistant", "I am an assistant.")],
        "<start_of_turn>model\nI am an assistant.<end_of_turn>\n<start_of_turn>model\n",
        id="gemma-assistant-is-model",
    ),
]


@pytest.mark.parametrize(("fmt", "pairs", "expected"), VECTORS)
def test_reference_vectors_with_objects(
    fmt: ChatFormat, pairs: list[tuple[str, str]], expected: str
) -> None:
    assert format_messages(conv(*pairs), fmt) == expected


@pytest.mark.parametrize(("fmt", "pairs", "expected"), VECTORS)
def test_reference_vectors_with_mappings(
    fmt: ChatFormat, pairs: list[tuple[str, str]], expected: str
) -> None:
    messages = [{"role": role, "content": content} for role, content in pairs]
    assert format_messages(messages, fmt) == expected


@pytest.mark.parametrize(("fmt", "pairs", "expected"), VECTORS)
def test_reference_vectors_through_builtin_template(
    fmt: ChatFormat, pairs: list[tuple[str, str]], expected: str
) -> None:
    template = BuiltinChatTemplate(fmt)
    assert template.name == fmt.value
    assert template.render(conv(*pairs)) == expected


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (ChatFormat.CHATML, "<|im_start|>user\nNo role set<|im_end|>\n<|im_start|>assistant\n"),
        (ChatFormat.LLAMA2, "[INST] No role set [/INST] "),
        (ChatFormat.GEMMA, "<start_of_turn>user\nNo role set<end_of_turn>\n<start_of_turn>model\n"),
    ],
)
@pytest.mark.parametrize(
    "message",
    [
        NoRole("No role set"),
        Msg(None, "No role set"),
        Msg("", "No role set"),
        {"content": "No role set"},
        {"role": None, "content": "No role set"},
    ],
    ids=["no-attribute", "none", "empty", "mapping-no-key", "mapping-none"],
)
def test_message_without_role_is_user(fmt: ChatFormat, expected: str, message: object) -> None:
    assert format_messages([message], fmt) == expected


@pytest.mark.parametrize(
    "skipped",
    [
        Msg("user", None),
        {"role": "user"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        Msg("user", [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]),
    ],
    ids=["none-content", "missing-content", "image-only-parts", "audio-only-parts"],
)
def test_messages_without_text_are_skipped(skipped: object) -> None:
    prompt = format_messages([skipped, Msg("user", "Hello")], ChatFormat.CHATML)
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"


def test_text_parts_are_joined_and_other_parts_dropped() -> None:
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "Describe "},
            {"type": "image_url", "image_url": {"url": "data:..."}},
            {"type": "text", "text": "this."},
        ],
    }
    assert format_messages([message], ChatFormat.GEMMA) == (
        "<start_of_turn>user\nDescribe this.<end_of_turn>\n<start_of_turn>model\n"
    )


def test_enum_and_dataclass_messages() -> None:
    messages = [Msg(Role.USER, "Hi"), DataMsg("assistant", "Hello"), Msg(Role.USER, "Bye")]
    assert format_messages(messages, ChatFormat.CHATML) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_role_is_case_insensitive() -> None:
    assert format_messages([Msg(" User ", "Hi")], ChatFormat.CHATML) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- tool role ---------------------------------------------------------------

TOOL_CONV = [
    ("user", "Weather in Paris?"),
    ("assistant", "Calling the weather tool."),
    ("tool", "18 degrees"),
]


def test_tool_role_chatml_is_verbatim() -> None:
    assert format_messages(conv(*TOOL_CONV), ChatFormat.CHATML) == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\nCalling the weather tool.<|im_end|>\n"
        "<|im_start|>tool\n18 degrees<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_role_gemma_is_labelled_user_turn() -> None:
    assert format_messages(conv(*TOOL_CONV), ChatFormat.GEMMA) == (
        "<start_of_turn>user\nWeather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\nCalling the weather tool.<end_of_turn>\n"
        "<start_of_turn>user\n[Tool Result]\n18 degrees<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_tool_role_llama2_is_labelled_user_input() -> None:
    assert format_messages(conv(*TOOL_CONV), ChatFormat.LLAMA2) == (
        "[INST] Weather in Paris? [/INST] Calling the weather tool. </s><s>"
        "[INST] [Tool Result]\n18 degrees [/INST] "
    )


# ---- Llama-2 details -----------------------------------------------------------


def test_llama2_joins_several_system_messages() -> None:
    messages = conv(("system", "Be brief."), ("user", "Hi"), ("system", "Be kind."))
    assert format_messages(messages, ChatFormat.LLAMA2) == (
        "[INST] <<SYS>>\nBe brief.\n\nBe kind.\n<</SYS>>\n\nHi [/INST] "
    )


def test_llama2_leading_assistant_and_consecutive_users() -> None:
    messages = conv(("assistant", "Welcome."), ("user", "One"), ("user", "Two"))
    # "Welcome." opens a block of its own; "One" is not followed by an assistant
    # reply, so "Two" opens the next block directly.
    assert format_messages(messages, ChatFormat.LLAMA2) == (
        "[INST] Welcome. [/INST] [INST] One [/INST] [INST] Two [/INST] "
    )


def test_llama2_ending_with_assistant() -> None:
    messages = conv(("user", "Hi"), ("assistant", "Hello"))
    assert format_messages(messages, ChatFormat.LLAMA2) == "[INST] Hi [/INST] Hello"


# ---- add_generation_prompt ----------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        (ChatFormat.CHATML, "<|im_start|>user\nHi<|im_end|>\n"),
        (ChatFormat.GEMMA, "<start_of_turn>user\nHi<end_of_turn>\n"),
        (ChatFormat.LLAMA2, "[INST] Hi [/INST] "),
    ],
)
def test_without_generation_prompt(fmt: ChatFormat, expected: str) -> None:
    assert format_messages(conv(("user", "Hi")), fmt, add_generation_prompt=False) == expected
    assert BuiltinChatTemplate(fmt).render(
        conv(("user", "Hi")), add_generation_prompt=False
    ) == expected


# ---- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "empty"),
        ([Msg("user", None)], "no message carries text"),
        ([Msg("wizard", "hi")], "unknown role 'wizard'"),
        ([Msg(42, "hi")], "role must be a str"),
        ([Msg("user", 3.5)], "content must be"),
        ([Msg("user", [{"type": "text", "text": 1}])], "needs a str 'text'"),
        ([Msg("user", [7])], "content part must be"),
        (["just a string"], "message 0 must be a mapping"),
        ([object()], "message 0 must be a mapping"),
        ("hello", "messages must be a sequence"),
        ({"role": "user", "content": "hi"}, "messages must be a sequence"),
    ],
)
def test_bad_messages_raise_invalid_input(messages: Any, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        format_messages(messages, ChatFormat.CHATML)


def test_format_must_be_a_chat_format() -> None:
    with pytest.raises(InvalidInputError, match="ChatFormat"):
        format_messages(conv(("user", "Hi")), "chatml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Format names and the default
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chatml", ChatFormat.CHATML),
        ("ChatML", ChatFormat.CHATML),
        ("chat_ml", ChatFormat.CHATML),
        ("chat-ml", ChatFormat.CHATML),
        ("CHATML", ChatFormat.CHATML),
        (" chatml ", ChatFormat.CHATML),
        ("llama", ChatFormat.LLAMA2),
        ("Llama", ChatFormat.LLAMA2),
        ("llama2", ChatFormat.LLAMA2),
        ("llama-2", ChatFormat.LLAMA2),
        ("llama_2", ChatFormat.LLAMA2),
        ("gemma", ChatFormat.GEMMA),
        ("Gemma", ChatFormat.GEMMA),
        ("gemma2", ChatFormat.GEMMA),
        ("gemma3", ChatFormat.GEMMA),
        ("gemma-2", ChatFormat.GEMMA),
        ("gemma-3", ChatFormat.GEMMA),
        ("gemma3n", ChatFormat.GEMMA),
    ],
)
def test_from_name(name: str, expected: ChatFormat) -> None:
    assert ChatFormat.from_name(name) is expected


@pytest.mark.parametrize("name", ["unknown", "", "llama3", "gemma4", "vicuna"])
def test_from_name_unknown_lists_valid_names(name: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        ChatFormat.from_name(name)
    message = str(info.value)
    assert repr(name) in message
    for valid in ("chatml", "llama2", "gemma"):
        assert valid in message


def test_from_name_rejects_non_str() -> None:
    with pytest.raises(InvalidInputError, match="must be a str"):
        ChatFormat.from_name(None)  # type: ignore[arg-type]


def test_default_is_chatml() -> None:
    assert DEFAULT_CHAT_FORMAT is ChatFormat.CHATML
    assert [f.value for f in ChatFormat] == ["chatml", "llama2", "gemma"]


# ---------------------------------------------------------------------------
# Double-formatting guard
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "first"),
    [
        (ChatFormat.CHATML, [SYS, ("user", "Hello!")]),
        (ChatFormat.GEMMA, [("system", "You are helpful."), ("user", "Hi!")]),
        (ChatFormat.LLAMA2, [SYS, ("user", "Hello!")]),
    ],
)
def test_formatting_twice_gives_the_single_formatted_prompt(
    fmt: ChatFormat, first: list[tuple[str, str]]
) -> None:
    first_pass = format_messages(conv(*first), fmt)
    second_pass = format_messages([Msg("user", first_pass)], fmt)
    assert second_pass == first_pass


def test_double_format_chatml_literal() -> None:
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_messages([Msg("user", prompt)], ChatFormat.CHATML) == prompt
    assert format_messages([{"content": prompt}], ChatFormat.CHATML) == prompt
    assert format_messages([Msg("user", prompt)], ChatFormat.CHATML).count("<|im_start|>") == 3


def test_double_format_gemma_literal() -> None:
    prompt = (
        "<start_of_turn>user\n[System Instructions]\nYou are helpful.<end_of_turn>\n"
        "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\n"
    )
    result = format_messages([Msg("user", prompt)], ChatFormat.GEMMA)
    assert result == prompt
    assert result.count("<start_of_turn>") == 3


def test_guard_passes_through_without_adding_generation_prompt() -> None:
    partial = "<|im_start|>user\nHi<|im_end|>\n"
    assert format_messages([Msg("user", partial)], ChatFormat.CHATML) == partial


def test_guard_skips_messages_without_text() -> None:
    prompt = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    messages = [Msg("user", None), Msg("user", prompt)]
    assert format_messages(messages, ChatFormat.GEMMA) == prompt


def test_guard_needs_the_same_format() -> None:
    chatml = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_messages([Msg("user", chatml)], ChatFormat.GEMMA) == (
        f"<start_of_turn>user\n{chatml}<end_of_turn>\n<start_of_turn>model\n"
    )


def test_guard_needs_a_single_user_message() -> None:
    chatml = "<|im_start|>user\nHi<|im_end|>\n"
    two = format_messages(conv(("system", "S"), ("user", chatml)), ChatFormat.CHATML)
    assert two == (
        "<|im_start|>system\nS<|im_end|>\n"
        f"<|im_start|>user\n{chatml}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    as_assistant = format_messages(conv(("assistant", chatml)), ChatFormat.CHATML)
    assert as_assistant == (
        f"<|im_start|>assistant\n{chatml}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_guard_ignores_a_marker_in_the_middle() -> None:
    text = "What does [INST] mean?"
    assert format_messages([Msg("user", text)], ChatFormat.LLAMA2) == (
        "[INST] What does [INST] mean? [/INST] "
    )


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        ("<|im_start|>user\nHi<|im_end|>\n", ChatFormat.CHATML, True),
        ("<|im_start|>user\nHi<|im_end|>\n", None, True),
        ("<|im_start|>user\nHi<|im_end|>\n", ChatFormat.GEMMA, False),
        ("<|im_start|>user\nHi<|im_end|>\n", ChatFormat.LLAMA2, False),
        ("  \n<|im_start|>system\nS<|im_end|>\n", ChatFormat.CHATML, True),
        ("<s>[INST] Hi [/INST] ", ChatFormat.LLAMA2, True),
        ("[INST] Hi [/INST] ", None, True),
        ("<bos><start_of_turn>user\nHi<end_of_turn>\n", ChatFormat.GEMMA, True),
        ("<start_of_turn>user\nHi<end_of_turn>\n", None, True),
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi", None, True),
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi", ChatFormat.CHATML, False),
        ("<bos><|turn>user\nHi<turn|>\n", None, True),
        ("Hello!", None, False),
        ("", None, False),
        ("Explain <|im_start|> tokens", None, False),
        ("Explain <start_of_turn> tokens", ChatFormat.GEMMA, False),
    ],
)
def test_is_preformatted(text: str, fmt: ChatFormat | None, expected: bool) -> None:
    assert is_preformatted(text, fmt) is expected


def test_is_preformatted_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        is_preformatted(b"<|im_start|>", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        is_preformatted("<|im_start|>", "chatml")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Jinja: real model templates from llama.cpp/models/templates
# ---------------------------------------------------------------------------

FOUR_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
WEATHER_TOOL_JSON = (
    '{"type": "function", "function": {"name": "get_weather", '
    '"description": "Get the current weather for a city.", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string", '
    '"description": "City name"}}, "required": ["city"]}}}'
)
WEATHER_TOOL_JSON_INDENT4 = """{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string",
                    "description": "City name"
                }
            },
            "required": [
                "city"
            ]
        }
    }
}"""


def test_qwen25_chatml_template() -> None:
    template = JinjaChatTemplate(read_template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    assert template.render(FOUR_TURNS) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi there! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The template adds its own default system prompt when none is given.
    assert template.render(FOUR_TURNS[1:2], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
        "You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
    )


def test_qwen25_with_tools_tool_call_and_tool_result() -> None:
    template = JinjaChatTemplate(read_template("Qwen-Qwen2.5-7B-Instruct.jinja"))
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "content": "18 degrees and sunny", "tool_call_id": "call_1"},
    ]
    rendered = template.render(messages, tools=[WEATHER_TOOL])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        "<tools>\n" + WEATHER_TOOL_JSON + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 degrees and sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system_turn = rendered[: rendered.index("<|im_end|>")]
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in system_turn


def test_qwen3_template_with_extra_variable() -> None:
    template = JinjaChatTemplate(read_template("Qwen-Qwen3-0.6B.jinja"))
    base = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi there! How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(FOUR_TURNS) == base
    assert template.render(FOUR_TURNS, enable_thinking=False) == base + "<think>\n\n</think>\n\n"


LLAMA32_FOUR_TURNS = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi there! How can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_llama32_template() -> None:
    template = JinjaChatTemplate(
        read_template("meta-llama-Llama-3.2-3B-Instruct.jinja"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    assert template.render(FOUR_TURNS, date_string="26 Jul 2024") == LLAMA32_FOUR_TURNS


def test_llama32_template_uses_strftime_now() -> None:
    template = JinjaChatTemplate(
        read_template("meta-llama-Llama-3.2-3B-Instruct.jinja"), bos_token="<|begin_of_text|>"
    )
    before = datetime.now().strftime("%d %b %Y")
    rendered = template.render(FOUR_TURNS)
    after = datetime.now().strftime("%d %b %Y")
    candidates = {
        LLAMA32_FOUR_TURNS.replace("26 Jul 2024", before),
        LLAMA32_FOUR_TURNS.replace("26 Jul 2024", after),
    }
    assert rendered in candidates


def test_llama32_with_tools_in_first_user_message() -> None:
    template = JinjaChatTemplate(
        read_template("meta-llama-Llama-3.2-3B-Instruct.jinja"), bos_token="<|begin_of_text|>"
    )
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    rendered = template.render(messages, tools=[WEATHER_TOOL], date_string="26 Jul 2024")
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call "
        "with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of '
        'argument name and its value}.Do not use variables.\n\n'
        + WEATHER_TOOL_JSON_INDENT4
        + "\n\nWhat's the weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_none_valued_keys_are_dropped_for_templates() -> None:
    # OpenAI clients send "tool_calls": null; Llama 3.2 tests `'tool_calls' in message`.
    template = JinjaChatTemplate(read_template("meta-llama-Llama-3.2-3B-Instruct.jinja"))
    messages = [dict(m, tool_calls=None, name=None) for m in FOUR_TURNS]
    assert template.render(messages, date_string="26 Jul 2024") == LLAMA32_FOUR_TURNS.replace(
        "<|begin_of_text|>", ""
    )


def test_gemma2_template() -> None:
    template = JinjaChatTemplate(read_template("google-gemma-2-2b-it.jinja"), bos_token="<bos>")
    assert template.render(FOUR_TURNS[1:]) == (
        "<bos><start_of_turn>user\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi there! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma2_raise_exception_surfaces_as_invalid_input() -> None:
    template = JinjaChatTemplate(read_template("google-gemma-2-2b-it.jinja"), bos_token="<bos>")
    with pytest.raises(InvalidInputError) as info:
        template.render(FOUR_TURNS)
    assert str(info.value) == "System role not supported"
    with pytest.raises(InvalidInputError) as info:
        template.render(FOUR_TURNS[1:2] * 2)
    assert str(info.value) == "Conversation roles must alternate user/assistant/user/assistant/..."


def test_gemma4_template() -> None:
    template = JinjaChatTemplate(read_template("google-gemma-4-31B-it.jinja"), bos_token="<bos>")
    assert template.render(FOUR_TURNS) == (
        "<bos><|turn>system\nYou are a helpful assistant.<turn|>\n"
        "<|turn>user\nHello!<turn|>\n"
        "<|turn>model\nHi there! How can I help?<turn|>\n"
        "<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_gemma4_template_with_tools() -> None:
    template = JinjaChatTemplate(read_template("google-gemma-4-31B-it.jinja"), bos_token="<bos>")
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    assert template.render(messages, tools=[WEATHER_TOOL]) == (
        "<bos><|turn>system\nYou are a helpful assistant."
        '<|tool>declaration:get_weather{description:<|"|>Get the current weather for a city.<|"|>'
        ',parameters:{properties:{city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>}},'
        'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n'
        "<|turn>user\nWhat's the weather in Paris?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )


# ---------------------------------------------------------------------------
# Jinja: environment behaviour
# ---------------------------------------------------------------------------


def test_messages_reach_the_template_as_dicts() -> None:
    template = JinjaChatTemplate(
        "{% for m in messages %}[{{ m.role }}|{{ m['content'] }}|"
        "{{ 'name' in m }}|{{ 'tool_call_id' in m }}]{% endfor %}"
    )
    messages = [
        DataMsg("user", "a"),
        DataMsg("tool", "b", tool_call_id="call_9"),
        Msg(Role.ASSISTANT, "c"),
        NoRole("d"),
        {"role": "user", "content": "e", "name": "bob"},
        Msg(StrRole.USER, "f"),
    ]
    assert template.render(messages) == (
        "[user|a|False|False][tool|b|False|True][assistant|c|False|False]"
        "[user|d|False|False][user|e|True|False][user|f|False|False]"
    )


def test_extra_values_become_plain_data() -> None:
    template = JinjaChatTemplate("{{ who }} {{ info.role }} {{ info['content'] }}")
    assert template.render([], who=StrRole.USER, info=DataMsg("tool", "r")) == "user tool r"


def test_context_variables() -> None:
    template = JinjaChatTemplate(
        "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ tools }}|{{ custom }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render([]) == "<s>|</s>|True|None|"
    assert template.render([], add_generation_prompt=False, custom=7) == "<s>|</s>|False|None|7"
    assert template.render([], bos_token="") == "|</s>|True|None|"


def test_tojson_like_transformers() -> None:
    template = JinjaChatTemplate(
        "{{ data | tojson }}\n{{ data | tojson(indent=2) }}\n"
        "{{ data | tojson(separators=(',', ':'), sort_keys=true) }}"
    )
    data = {"z": "é<b>&'", "a": [1, None, True]}
    assert template.render([], data=data) == (
        '{"z": "é<b>&\'", "a": [1, null, true]}\n'
        '{\n  "z": "é<b>&\'",\n  "a": [\n    1,\n    null,\n    true\n  ]\n}\n'
        '{"a":[1,null,true],"z":"é<b>&\'"}'
    )


def test_whitespace_control_matches_transformers() -> None:
    # trim_blocks + lstrip_blocks; a single trailing newline of the source is dropped.
    template = JinjaChatTemplate("    {% if true %}\nA\n    {% endif %}\nB\n")
    assert template.render([]) == "A\nB"


def test_loop_controls_and_generation_tag() -> None:
    template = JinjaChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'assistant' %}{% generation %}<{{ m.content }}>{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    messages = conv(("user", "u1"), ("assistant", "a1"), ("user", "u2"))
    assert template.render(messages) == "u1<a1>"


def test_undefined_is_lenient_like_transformers() -> None:
    assert JinjaChatTemplate("[{{ nothing }}][{{ messages[0].missing }}]").render(
        [{"role": "user", "content": "x"}]
    ) == "[][]"


def test_raise_exception_in_inline_template() -> None:
    template = JinjaChatTemplate("{{ raise_exception('no tools here: ' ~ (tools | length)) }}")
    with pytest.raises(InvalidInputError) as info:
        template.render([], tools=[WEATHER_TOOL])
    assert str(info.value) == "no tools here: 1"


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{% if %}x{% endif %}", "syntax error at line 1"),
        ("ok\n{% for m in messages %}", "syntax error at line 2"),
        ("{{ x | no_such_filter }}", "no_such_filter"),
        ("{% unknowntag %}", "unknowntag"),
    ],
)
def test_syntax_error_raises_at_construction(source: str, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        JinjaChatTemplate(source)


@pytest.mark.parametrize(
    "source", ["[{{ ''.__class__ }}]", "[{{ raise_exception.__globals__ }}]", "[{{ m.__dict__ }}]"]
)
def test_sandbox_hides_unsafe_attributes(source: str) -> None:
    # One unsafe lookup yields an undefined value, which prints as nothing.
    assert JinjaChatTemplate(source).render([], m=Msg("user", "x")) == "[]"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__.os }}",
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(source: str) -> None:
    template = JinjaChatTemplate(source)
    with pytest.raises(InvalidInputError, match="unsafe"):
        template.render([{"role": "user", "content": "x"}])


def test_render_time_errors_become_invalid_input() -> None:
    template = JinjaChatTemplate("{{ messages[0].content + 1 }}")
    with pytest.raises(InvalidInputError, match="TypeError"):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("tools", "needle"),
    [("get_weather", "tools must be a list"), ([42], "tool 0 must be a mapping")],
)
def test_bad_tools_raise_invalid_input(tools: Any, needle: str) -> None:
    with pytest.raises(InvalidInputError, match=needle):
        JinjaChatTemplate("x").render([], tools=tools)


def test_template_source_must_be_str() -> None:
    with pytest.raises(InvalidInputError):
        JinjaChatTemplate(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Built-in template object: tools and extras
# ---------------------------------------------------------------------------


def test_builtin_template_rejects_tools() -> None:
    template = BuiltinChatTemplate(ChatFormat.CHATML)
    with pytest.raises(UnsupportedInputError, match="tool definitions need a Jinja"):
        template.render(conv(("user", "Hi")), tools=[WEATHER_TOOL])


def test_builtin_template_accepts_empty_tools_and_extras() -> None:
    template = BuiltinChatTemplate(ChatFormat.GEMMA)
    assert template.render(conv(("user", "Hi")), tools=[], enable_thinking=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


# ---------------------------------------------------------------------------
# Architecture inference and resolution
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("gemma", ChatFormat.GEMMA),
        ("gemma2", ChatFormat.GEMMA),
        ("gemma3", ChatFormat.GEMMA),
        ("gemma3n", ChatFormat.GEMMA),
        ("gemma4", ChatFormat.GEMMA),
        ("gemma-embedding", ChatFormat.GEMMA),
        ("Gemma3", ChatFormat.GEMMA),
        ("llama", ChatFormat.LLAMA2),
        (" LLAMA ", ChatFormat.LLAMA2),
        ("mistral3", ChatFormat.LLAMA2),
        ("llama4", ChatFormat.CHATML),
        ("llama-embed", ChatFormat.CHATML),
        ("qwen2", ChatFormat.CHATML),
        ("qwen3", ChatFormat.CHATML),
        ("qwen3moe", ChatFormat.CHATML),
        ("phi3", ChatFormat.CHATML),
        ("some-future-arch", ChatFormat.CHATML),
        ("", ChatFormat.CHATML),
        (None, ChatFormat.CHATML),
    ],
)
def test_format_for_architecture(arch: str | None, expected: ChatFormat) -> None:
    assert format_for_architecture(arch) is expected


def test_format_for_architecture_rejects_non_str() -> None:
    with pytest.raises(InvalidInputError):
        format_for_architecture(3)  # type: ignore[arg-type]


QWEN_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("override", "expected_name"),
    [
        ("chatml", "chatml"),
        ("ChatML", "chatml"),
        (" llama-2 ", "llama2"),
        ("gemma3", "gemma"),
    ],
)
def test_resolve_override_format_name(override: str, expected_name: str) -> None:
    chosen = resolve_chat_template(override, QWEN_LIKE, "qwen2")
    assert isinstance(chosen, BuiltinChatTemplate)
    assert chosen.name == expected_name


def test_resolve_override_jinja_source_beats_model_template() -> None:
    override = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    chosen = resolve_chat_template(override, QWEN_LIKE, "qwen2")
    assert isinstance(chosen, JinjaChatTemplate)
    assert chosen.name == "jinja:override"
    assert chosen.render(conv(("user", "Hi"))) == "user: Hi\n"


def test_resolve_override_with_syntax_error_raises() -> None:
    with pytest.raises(InvalidInputError, match="syntax error"):
        resolve_chat_template("{% if %}", QWEN_LIKE, "qwen2")


@pytest.mark.parametrize("override", [None, "", "   "])
def test_resolve_model_template(override: str | None) -> None:
    chosen = resolve_chat_template(override, QWEN_LIKE, "gemma3")
    assert chosen.name == "jinja:model"
    assert chosen.render(conv(("user", "Hi"))) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_resolve_model_template_gets_special_tokens() -> None:
    chosen = resolve_chat_template(
        None, read_template("google-gemma-2-2b-it.jinja"), "gemma2", bos_token="<bos>"
    )
    assert chosen.name == "jinja:model"
    assert chosen.render(conv(("user", "Hi"))) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )


def test_resolve_model_template_holding_a_format_name() -> None:
    chosen = resolve_chat_template(None, "gemma", "qwen2")
    assert chosen.name == "gemma"


@pytest.mark.parametrize(
    ("model_template", "arch", "expected_name"),
    [
        (None, "gemma3", "gemma"),
        ("", "gemma3", "gemma"),
        ("  \n", "llama", "llama2"),
        (None, "qwen3", "chatml"),
        (None, None, "chatml"),
        (None, "unknown-arch", "chatml"),
    ],
)
def test_resolve_falls_back_to_architecture(
    model_template: str | None, arch: str | None, expected_name: str
) -> None:
    chosen = resolve_chat_template(None, model_template, arch)
    assert isinstance(chosen, BuiltinChatTemplate)
    assert chosen.name == expected_name


def test_resolved_gemma_fallback_renders_reference_vector() -> None:
    chosen = resolve_chat_template(None, None, "gemma3")
    assert chosen.render(conv(("user", "Hello!"))) == (
        "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"
    )


def test_resolve_rejects_non_str_templates() -> None:
    with pytest.raises(InvalidInputError):
        resolve_chat_template(42, None, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        resolve_chat_template(None, b"x", None)  # type: ignore[arg-type]
