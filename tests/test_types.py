"""Tests of xybrid.types: construction, validation and serialisation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from xybrid.errors import InvalidInputError, UnsupportedInputError
from xybrid.types import (
    MAX_SEED,
    ChatMessage,
    GenerationConfig,
    GenerationOutput,
    LlmConfig,
    PartialToken,
)

# ---------------------------------------------------------------------------
# ChatMessage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "role", "content"),
    [
        (ChatMessage.system("be brief"), "system", "be brief"),
        (ChatMessage.user("hi"), "user", "hi"),
        (ChatMessage.assistant("hello"), "assistant", "hello"),
        (ChatMessage.tool("42"), "tool", "42"),
    ],
)
def test_chat_message_constructors(message: ChatMessage, role: str, content: str) -> None:
    assert message.role == role
    assert message.content == content
    assert message.name is None
    assert message.tool_call_id is None


def test_tool_message_keeps_call_id() -> None:
    message = ChatMessage.tool("{\"t\": 21}", tool_call_id="call_1")
    assert message.tool_call_id == "call_1"
    assert message.to_dict() == {"role": "tool", "content": "{\"t\": 21}", "tool_call_id": "call_1"}


def test_chat_message_is_frozen() -> None:
    message = ChatMessage.user("hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.content = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"role": "robot", "content": "x"}, "ChatMessage.role"),
        ({"role": "", "content": "x"}, "ChatMessage.role"),
        ({"role": 1, "content": "x"}, "ChatMessage.role"),
        ({"role": "user", "content": None}, "ChatMessage.content"),
        ({"role": "user", "content": 5}, "ChatMessage.content"),
        ({"role": "user", "content": b"bytes"}, "ChatMessage.content"),
        ({"role": "user", "content": "x", "name": ""}, "ChatMessage.name"),
        ({"role": "tool", "content": "x", "tool_call_id": 3}, "ChatMessage.tool_call_id"),
    ],
)
def test_chat_message_validation_names_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidInputError, match=field_name):
        ChatMessage(**kwargs)


@pytest.mark.parametrize(
    "message",
    [
        ChatMessage.user("hi"),
        ChatMessage("user", "hi", name="ann"),
        ChatMessage.tool("r", tool_call_id="c9"),
        ChatMessage.assistant(""),
        ChatMessage.system("多语言 😀"),
    ],
)
def test_chat_message_dict_round_trip(message: ChatMessage) -> None:
    data = message.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert ChatMessage.from_dict(data) == message


def test_to_dict_omits_unset_optionals() -> None:
    assert ChatMessage.user("hi").to_dict() == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"role": "assistant", "content": None, "tool_calls": []}, ChatMessage.assistant("")),
        ({"role": "assistant"}, ChatMessage.assistant("")),
        (
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ChatMessage.user("ab"),
        ),
        ({"role": "user", "content": "x", "extra": 1}, ChatMessage.user("x")),
    ],
)
def test_from_dict_openai_shapes(data: dict[str, Any], expected: ChatMessage) -> None:
    assert ChatMessage.from_dict(data) == expected


def test_from_dict_reads_media_parts() -> None:
    import base64

    from xybrid.media import Audio, Image

    data = {"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                             + base64.b64encode(b"PNGDATA").decode()}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(),
                                                "format": "wav"}},
    ]}
    message = ChatMessage.from_dict(data)
    assert message.content == "what is this?"
    assert [type(m) for m in message.media] == [Image, Audio]
    assert message.media[0].source == b"PNGDATA"
    assert message.media[1].source == b"RIFF"


@pytest.mark.parametrize("part", [
    {"type": "video_url", "video_url": {"url": "clip.mp4"}},
    {"type": "file", "file": {}},
    {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
])
def test_from_dict_rejects_unsupported_parts(part: dict[str, object]) -> None:
    with pytest.raises(UnsupportedInputError):
        ChatMessage.from_dict({"role": "user", "content": [part]})


@pytest.mark.parametrize(
    ("data", "field_name"),
    [
        ({"content": "x"}, "ChatMessage.role"),
        ({"role": "nobody", "content": "x"}, "ChatMessage.role"),
        ({"role": "user", "content": 3}, "ChatMessage.content"),
        ({"role": "user", "content": [{"type": "text", "text": 1}]}, "ChatMessage.content part text"),
        ({"role": "user", "content": ["plain"]}, "ChatMessage.content part"),
    ],
)
def test_from_dict_validation(data: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidInputError, match=field_name):
        ChatMessage.from_dict(data)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(InvalidInputError):
        ChatMessage.from_dict(["user", "hi"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# LlmConfig
# ---------------------------------------------------------------------------


def test_llm_config_defaults() -> None:
    config = LlmConfig("model.gguf")
    assert config.model_path == "model.gguf"
    assert config.context_length == 4096
    assert config.gpu_layers == 0
    assert config.n_threads == 0
    assert config.n_batch == 512
    assert config.n_ubatch == 512
    assert config.flash_attn is False
    assert config.chat_template is None
    assert config.use_mmap is True
    assert config.prefix_reuse == "longest"


def test_llm_config_accepts_pathlike_and_stores_str(tmp_path: Path) -> None:
    config = LlmConfig(tmp_path / "m.gguf", gpu_layers=-1, chat_template="chatml")
    assert config.model_path == str(tmp_path / "m.gguf")
    assert isinstance(config.model_path, str)
    assert config.gpu_layers == -1
    assert config.chat_template == "chatml"


def test_llm_config_replace_revalidates() -> None:
    config = LlmConfig("m.gguf")
    bigger = config.replace(context_length=8192, flash_attn=True)
    assert (bigger.context_length, bigger.flash_attn) == (8192, True)
    assert config.context_length == 4096
    with pytest.raises(InvalidInputError, match="LlmConfig.n_batch"):
        config.replace(n_batch=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_length": 0}, "LlmConfig.context_length must be a positive integer, got 0"),
        ({"context_length": -5}, "LlmConfig.context_length"),
        ({"context_length": True}, "LlmConfig.context_length"),
        ({"context_length": 4096.0}, "LlmConfig.context_length"),
        ({"gpu_layers": -2}, "LlmConfig.gpu_layers"),
        ({"gpu_layers": False}, "LlmConfig.gpu_layers"),
        ({"n_threads": -1}, "LlmConfig.n_threads"),
        ({"n_batch": 0}, "LlmConfig.n_batch"),
        ({"n_ubatch": 0}, "LlmConfig.n_ubatch"),
        ({"n_ubatch": "512"}, "LlmConfig.n_ubatch"),
        ({"flash_attn": 1}, "LlmConfig.flash_attn"),
        ({"use_mmap": "yes"}, "LlmConfig.use_mmap"),
        ({"chat_template": ""}, "LlmConfig.chat_template"),
        ({"chat_template": 3}, "LlmConfig.chat_template"),
    ],
)
def test_llm_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        LlmConfig("m.gguf", **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("path", ["", None, 3, b"m.gguf"])
def test_llm_config_rejects_bad_path(path: object) -> None:
    with pytest.raises(InvalidInputError, match="LlmConfig.model_path"):
        LlmConfig(path)  # type: ignore[arg-type]


def test_invalid_input_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        LlmConfig("m.gguf", context_length=0)


# ---------------------------------------------------------------------------
# GenerationConfig
# ---------------------------------------------------------------------------


def test_generation_config_defaults() -> None:
    config = GenerationConfig()
    assert config.max_tokens == 256
    assert config.temperature == 0.7
    assert config.top_p == 0.9
    assert config.min_p == 0.05
    assert config.top_k == 40
    assert config.repetition_penalty == 1.0
    assert config.repetition_penalty_window == 64
    assert config.frequency_penalty == 0.0
    assert config.presence_penalty == 0.0
    assert config.seed is None
    assert config.stop_sequences == ()
    assert config.grammar is None
    assert not config.is_greedy


def test_greedy_sets_temperature_zero() -> None:
    config = GenerationConfig.greedy(max_tokens=8)
    assert config.temperature == 0.0
    assert config.max_tokens == 8
    assert config.is_greedy
    assert GenerationConfig(top_k=1).is_greedy


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (["</s>", "END"], ("</s>", "END")),
        (("a",), ("a",)),
        (iter(["x", "y"]), ("x", "y")),
        ("END", ("END",)),  # a lone string is one sequence
        ((), ()),
    ],
)
def test_stop_sequences_normalised_to_tuple(given: Any, stored: tuple[str, ...]) -> None:
    assert GenerationConfig(stop_sequences=given).stop_sequences == stored


def test_integers_accepted_for_float_fields() -> None:
    config = GenerationConfig(temperature=1, top_p=1, repetition_penalty=2)
    assert isinstance(config.temperature, float) and config.temperature == 1.0
    assert isinstance(config.top_p, float)
    assert isinstance(config.repetition_penalty, float)


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": "0.7"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 4.0}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty_window": -2}, "repetition_penalty_window"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"stop_sequences": ["ok", ""]}, "stop_sequences"),
        ({"stop_sequences": [1]}, "stop_sequences"),
        ({"stop_sequences": 5}, "stop_sequences"),
        ({"grammar": ""}, "grammar"),
        ({"grammar": 1}, "grammar"),
    ],
)
def test_generation_config_validation(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(InvalidInputError, match=f"GenerationConfig.{field_name} must be"):
        GenerationConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"top_p": 1.0},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"top_k": 0},
        {"repetition_penalty_window": -1},
        {"repetition_penalty_window": 0},
        {"frequency_penalty": -2.0, "presence_penalty": 2.0},
        {"seed": 0},
        {"seed": MAX_SEED},
        {"grammar": 'root ::= "yes" | "no"'},
    ],
)
def test_generation_config_boundaries_accepted(kwargs: dict[str, Any]) -> None:
    config = GenerationConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


def test_generation_config_replace_revalidates_and_is_frozen() -> None:
    config = GenerationConfig(stop_sequences=["a"])
    changed = config.replace(temperature=0.0, stop_sequences=["b", "c"])
    assert changed.temperature == 0.0
    assert changed.stop_sequences == ("b", "c")
    assert config.stop_sequences == ("a",)
    with pytest.raises(InvalidInputError, match="top_p"):
        config.replace(top_p=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 1.0  # type: ignore[misc]


def test_generation_config_equality_and_hash() -> None:
    assert GenerationConfig(stop_sequences=["a"]) == GenerationConfig(stop_sequences=("a",))
    assert hash(GenerationConfig()) == hash(GenerationConfig())


# ---------------------------------------------------------------------------
# PartialToken and GenerationOutput
# ---------------------------------------------------------------------------


def test_partial_token() -> None:
    piece = PartialToken("lo", 1, "Hello", token_id=42)
    assert (piece.text, piece.index, piece.cumulative_text, piece.token_id) == ("lo", 1, "Hello", 42)
    assert not piece.is_final
    final = PartialToken("", 2, "Hello", finish_reason="stop")
    assert final.is_final
    assert final.token_id is None


CANONICAL_KEYS = {
    "text",
    "finish_reason",
    "stop_reason",
    "tokens_in",
    "prompt_cached_tokens",
    "tokens_out",
    "tokens_generated",
    "generation_time_ms",
    "tokens_per_second",
    "ttft_ms",
    "mean_itl_ms",
    "p95_itl_ms",
    "emitted_chunks",
    "inter_chunk_ms",
    "decode_tps",
    "prefill_tps",
    "media_tokens",
    "queued_ms",
    "token_ids",
}


def test_generation_output_to_dict_full() -> None:
    output = GenerationOutput(
        text="Hi",
        tokens_generated=3,
        generation_time_ms=120.5,
        tokens_per_second=24.9,
        finish_reason="stop",
        ttft_ms=40.0,
        mean_itl_ms=20.0,
        p95_itl_ms=25.0,
        emitted_chunks=2,
        inter_chunk_ms=21.0,
        decode_tps=50.0,
        prefill_tps=900.0,
        prompt_tokens=17,
        cached_prompt_tokens=12,
        stop_reason="eog",
        token_ids=(5, 6, 7),
    )
    data = output.to_dict()
    assert set(data) == CANONICAL_KEYS
    assert data["tokens_in"] == 17
    assert data["prompt_cached_tokens"] == 12
    assert data["tokens_out"] == data["tokens_generated"] == 3
    assert data["ttft_ms"] == 40.0
    assert data["p95_itl_ms"] == 25.0
    assert data["decode_tps"] == 50.0
    assert data["stop_reason"] == "eog"
    assert data["finish_reason"] == "stop"
    assert data["token_ids"] == [5, 6, 7]
    assert json.loads(json.dumps(data)) == data


def test_generation_output_minimal_defaults() -> None:
    output = GenerationOutput("x", 1, 10.0, 100.0, "length")
    data = output.to_dict()
    assert set(data) == CANONICAL_KEYS
    assert data["ttft_ms"] is None
    assert data["mean_itl_ms"] is None
    assert data["emitted_chunks"] == 0
    assert data["token_ids"] == []
    assert data["tokens_in"] == 0
    assert data["queued_ms"] == 0.0
    assert output.token_ids == ()
