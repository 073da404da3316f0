"""The stages of one request around the engine: prepare, then finish.

Preparing turns chat messages (or a raw prompt) and a
:class:`~xybrid.types.GenerationConfig` into what the engine runs: the prompt
tokens (or a tokenized media prompt), the stop strings, the tools offered and
a sampler. Finishing turns the engine's raw result into the
:class:`~xybrid.types.GenerationOutput` a user sees: text cleaned of chat
markers and reasoning, tool calls parsed, finish reason and telemetry.

Neither stage touches the KV cache or any backend state, so every way of
running a request shares them: the single-sequence loop, the batching
scheduler, the server and the llama-cpp-python facade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xybrid._native import _engine
from xybrid.chat_templates import ChatTemplate
from xybrid.errors import ContextOverflowError, InvalidInputError, ToolCallError, UnsupportedInputError
from xybrid.grammar import json_schema_to_gbnf, response_format_to_grammar, validate_grammar
from xybrid.logprobs import attach_logprobs
from xybrid.media import Audio, Image, audio_to_item, image_to_rgb
from xybrid.streaming import (
    CHAT_STOP_PATTERNS,
    CHAT_STOP_PATTERNS_BROKEN,
    StreamingTextFilter,
    merge_stop_patterns,
    strip_thinking_tags,
    trim_partial_stop_suffix,
    truncate_at_first_stop,
)
from xybrid.telemetry import compute_telemetry, record_on_current_span
from xybrid.tool_calls import (
    TextEvent,
    ToolCallParser,
    parse_tool_calls,
    tool_call_grammar,
    tools_to_system_prompt,
    validate_tools,
)
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput

__all__ = [
    "ModelView",
    "PieceStream",
    "PreparedRequest",
    "as_messages",
    "build_output",
    "check_config",
    "check_raw_prompt",
    "grammar_for",
    "make_sampler",
    "prepare_chat",
    "prepare_raw",
]


@dataclass(frozen=True)
class ModelView:
    """What preparing a request needs of a loaded model."""

    model: Any  # _engine.Model
    template: ChatTemplate
    bos_text: str
    n_ctx: int
    multimodal: Any = None  # _engine.Multimodal when a projector is loaded
    # The model's longest token text in bytes (Model.max_piece_bytes); 0 when
    # unknown. Bounds the prompt text that can still fit before tokenizing.
    max_piece_bytes: int = 0


@dataclass
class PreparedRequest:
    """A request ready for the engine.

    ``tokens`` is the whole prompt; a media prompt has none and carries its
    tokenized ``chunks`` instead (``n_prompt`` positions, ``media_tokens`` of
    them media). ``stops`` are the strings the engine cuts at; ``chat`` says
    whether the reply gets the chat clean-up when it is finished.
    """

    tokens: list[int]
    stops: tuple[str, ...]
    chat: bool
    tool_names: tuple[str, ...] = ()
    chunks: Any = None
    media_tokens: int = 0
    n_prompt: int = 0

    @property
    def prompt_positions(self) -> int:
        return len(self.tokens) or self.n_prompt


# --- preparing ------------------------------------------------------------------------


def check_config(config: GenerationConfig | None) -> GenerationConfig:
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InvalidInputError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return config


def check_raw_prompt(prompt: object) -> None:
    """A raw prompt is text or a sequence of plain ints (token ids)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidInputError(
            f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}")
    for i, t in enumerate(prompt):
        if type(t) is not int:  # bool and numpy integers are refused, as by the engine
            raise InvalidInputError(
                f"prompt token {i} must be an int token id, got {type(t).__name__}")


def as_messages(messages: Sequence[Any]) -> list[ChatMessage]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError(
            "messages must be a sequence of ChatMessage or {'role', 'content'} dicts; "
            "for a plain prompt use generate_raw()")
    if not messages:
        raise InvalidInputError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            out.append(m)
        elif isinstance(m, dict):
            out.append(ChatMessage.from_dict(m))
        else:
            raise InvalidInputError(
                f"messages[{i}] must be a ChatMessage or a dict, got {type(m).__name__}")
    return out


def _check_fits(tokens: list[int], n_ctx: int) -> None:
    if not tokens:
        raise InvalidInputError("the prompt is empty")
    if len(tokens) >= n_ctx:
        raise ContextOverflowError(
            f"input too long: {len(tokens)} tokens do not fit the context window of "
            f"{n_ctx} tokens; shorten the prompt or the conversation history")


def check_text_fits(view: ModelView, text: str) -> None:
    """Refuse text that cannot fit the context before tokenizing it: no token
    stands for more than ``max_piece_bytes`` bytes, so more than
    ``n_ctx * max_piece_bytes`` bytes are more than ``n_ctx`` tokens. (A
    100 MB prompt used to be tokenized in full, for a minute and gigabytes,
    only to be refused afterwards.) Characters are counted, not bytes: each
    is at least one byte, and counting needs no copy of the text."""
    if view.max_piece_bytes <= 0:
        return
    bound = view.n_ctx * view.max_piece_bytes
    if len(text) > bound:
        raise ContextOverflowError(
            f"input too long: the prompt has {len(text)} characters, more than the "
            f"{bound} that could fit the context window of {view.n_ctx} tokens (no token "
            f"of this model is longer than {view.max_piece_bytes} bytes); shorten the "
            "prompt or the conversation history")


def tokenize_chat(view: ModelView, prompt: str) -> list[int]:
    check_text_fits(view, prompt)
    tokens: list[int] = view.model.tokenize(prompt, add_special=True, parse_special=True)
    # Templates that write the BOS text themselves would otherwise get a
    # second BOS from the tokenizer.
    bos = view.model.bos_token
    if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
        tokens = tokens[1:]
    return tokens


def prepare_chat(view: ModelView, msgs: list[ChatMessage], config: GenerationConfig) -> PreparedRequest:
    """Template, tools and tokens (or media chunks) for a chat request."""
    tools = offered_tools(config)
    template_tools: list[dict[str, Any]] | None = None
    if tools:
        msgs, template_tools = with_tool_prompt(view.template, msgs, tools)
    stops = merge_stop_patterns(config.stop_sequences, CHAT_STOP_PATTERNS)
    if any(m.media for m in msgs):
        prepared = _prepare_media(view, msgs, template_tools, stops)
    else:
        prompt = view.template.render(msgs, add_generation_prompt=True, tools=template_tools)
        tokens = tokenize_chat(view, prompt)
        _check_fits(tokens, view.n_ctx)
        prepared = PreparedRequest(tokens, stops, True)
    prepared.tool_names = tuple(t["function"]["name"] for t in tools)
    return prepared


def prepare_raw(view: ModelView, prompt: str | Sequence[int],
                config: GenerationConfig) -> PreparedRequest:
    """Tokens for a raw continuation: text (BOS added) or token ids as given."""
    check_raw_prompt(prompt)
    if isinstance(prompt, str):
        check_text_fits(view, prompt)
        tokens = view.model.tokenize(prompt, add_special=True, parse_special=True)
    else:
        tokens = list(prompt)
        n_vocab = view.model.n_vocab
        for i, t in enumerate(tokens):
            if not 0 <= t < n_vocab:
                raise InvalidInputError(
                    f"prompt token {i} = {t} is not a token id of this model (0..{n_vocab - 1})")
    _check_fits(tokens, view.n_ctx)
    return PreparedRequest(tokens, tuple(config.stop_sequences), False)


def _prepare_media(view: ModelView, msgs: list[ChatMessage],
                   tools: list[dict[str, Any]] | None, stops: tuple[str, ...]) -> PreparedRequest:
    """Render the media markers into the prompt and tokenize text and media
    through mtmd. Evaluating the chunks is the engine's job. (mtmd_tokenize
    takes the projector as const, so it may run while a scheduler thread
    encodes another request's media with the same projector.)"""
    mm = view.multimodal
    if mm is None:
        raise UnsupportedInputError(
            "this message carries images or audio, but no multimodal projector is loaded: "
            "pass LlmConfig(mmproj_path=...) for a vision or audio model")
    items: list[tuple[Any, ...]] = []
    rendered: list[ChatMessage] = []
    for m in msgs:
        markers = ""
        for item in m.media:
            if isinstance(item, Image):
                if not mm.vision:
                    raise UnsupportedInputError("the loaded projector has no vision encoder")
                items.append(("image", *image_to_rgb(item)))
            elif isinstance(item, Audio):
                if not mm.audio:
                    raise UnsupportedInputError("the loaded projector has no audio encoder")
                items.append(audio_to_item(item, mm.audio_sample_rate))
            markers += mm.marker + "\n"
        rendered.append(ChatMessage(m.role, markers + m.content, m.name, m.tool_call_id))
    prompt = view.template.render(rendered, add_generation_prompt=True, tools=tools)
    if view.bos_text and prompt.startswith(view.bos_text):
        prompt = prompt[len(view.bos_text):]  # mtmd adds the BOS itself
    check_text_fits(view, prompt)
    chunks = mm.tokenize(prompt, items)
    if chunks.n_pos >= view.n_ctx:
        raise ContextOverflowError(
            f"input too long: the prompt with its media takes {chunks.n_pos} positions, "
            f"more than the context window of {view.n_ctx}")
    media = sum(chunks.media_tokens().values())
    return PreparedRequest([], stops, True, chunks=chunks, media_tokens=media,
                           n_prompt=chunks.n_tokens)


def make_sampler(model: Any, config: GenerationConfig, n_ctx: int | None = None) -> Any:
    """The request's sampler. ``n_ctx`` (the context's size) bounds the
    penalty window and is what ``repetition_penalty_window=-1`` means."""
    return _engine.Sampler(
        model,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=config.min_p,
        repeat_penalty=config.repetition_penalty,
        repeat_last_n=config.repetition_penalty_window,
        frequency_penalty=config.frequency_penalty,
        presence_penalty=config.presence_penalty,
        seed=config.seed,
        grammar=grammar_for(config),
        logit_bias=config.logit_bias,
        n_ctx=n_ctx,
    )


def grammar_for(config: GenerationConfig) -> str | None:
    """The GBNF that constrains this generation, pre-checked before llama.cpp
    parses it (size and alternation bounds, syntax)."""
    grammar: str | None
    if config.grammar is not None:
        grammar = config.grammar
    elif config.json_schema is not None:
        grammar = json_schema_to_gbnf(config.json_schema)
    elif config.response_format is not None:
        grammar = response_format_to_grammar(config.response_format)
    elif config.tool_choice == "required":
        grammar = tool_call_grammar(list(config.tools), "hermes")
    else:
        return None
    return validate_grammar(grammar) if grammar is not None else None


def offered_tools(config: GenerationConfig) -> list[dict[str, Any]]:
    if not config.tools or config.tool_choice == "none":
        return []
    return [spec.to_openai() for spec in validate_tools(list(config.tools))]


def with_tool_prompt(
    template: ChatTemplate, msgs: list[ChatMessage], tools: list[dict[str, Any]]
) -> tuple[list[ChatMessage], list[dict[str, Any]] | None]:
    """Messages and the ``tools`` template variable. Templates that know
    tools get them as that variable; for the others the tool descriptions go
    into the system message."""
    if "tools" in (getattr(template, "source", "") or ""):
        return msgs, tools
    described = tools_to_system_prompt(tools, "hermes")
    if msgs and msgs[0].role == "system":
        return [ChatMessage.system(msgs[0].content + "\n\n" + described), *msgs[1:]], None
    return [ChatMessage.system(described), *msgs], None


# --- finishing ------------------------------------------------------------------------


class PieceStream:
    """Turns the engine's raw chunks into the text a user sees: reasoning
    and chat stop markers removed (StreamingTextFilter) and, when tools are
    offered, tool-call markup held out of the text (ToolCallParser)."""

    def __init__(self, prepared: PreparedRequest) -> None:
        if prepared.chat:
            self.filter = StreamingTextFilter(prepared.stops)
        else:
            # Raw continuations pass through untouched (the engine already
            # cut at the caller's stop sequences).
            self.filter = StreamingTextFilter((), strip_thinking=False)
        self.parser = ToolCallParser("auto", tool_names=prepared.tool_names) \
            if prepared.tool_names else None
        self.cumulative = ""

    def _text(self, chunk: str | None, final: bool) -> str:
        out = chunk or ""
        if self.parser is not None:
            events = self.parser.feed(out) if out else []
            if final:
                events += self.parser.finish()
            out = "".join(e.text for e in events if isinstance(e, TextEvent))
        self.cumulative += out
        return out

    def push(self, chunk: str) -> str:
        return self._text(self.filter.push(chunk), final=False)

    def finish(self) -> str:
        return self._text(self.filter.finish(), final=True)


def build_output(prepared: PreparedRequest, config: GenerationConfig, result: Any, *,
                 start_ns: int | None = None, prefilled: int | None = None) -> GenerationOutput:
    """Clean the text, parse tool calls, derive finish reason and telemetry.

    ``start_ns`` and ``prefilled`` override the result's own when work
    before the loop counts as prefill (a media prompt evaluated first).
    Raises :class:`ToolCallError` when the model wrote a call that does not
    parse.
    """
    text = result.text
    stopped = result.stop_reason in ("stop", "eog")
    thinking = ""
    tool_calls: tuple[dict[str, Any], ...] = ()
    if prepared.chat:
        final_patterns = merge_stop_patterns(
            config.stop_sequences, CHAT_STOP_PATTERNS + CHAT_STOP_PATTERNS_BROKEN)
        text, cut = truncate_at_first_stop(text, final_patterns)
        text, trimmed = trim_partial_stop_suffix(text, final_patterns)
        parsed = parse_tool_calls(text, "auto" if prepared.tool_names else "none",
                                  tool_names=prepared.tool_names or None)
        if parsed.malformed and not parsed.tool_calls:
            raise ToolCallError(
                f"the model wrote a tool call that does not parse: {parsed.malformed[0].error}",
                parsed.malformed[0].raw)
        tool_calls = tuple(call.to_openai() for call in parsed.tool_calls)
        thinking = parsed.thinking
        text = strip_thinking_tags(parsed.text).strip()
        stopped = stopped or cut or trimmed
    finish_reason = {"cancelled": "cancelled"}.get(
        result.stop_reason, "stop" if stopped else "length")
    if tool_calls:
        finish_reason = "tool_calls"
    prompt_tokens = prepared.prompt_positions
    if prefilled is None:
        prefilled = result.n_prompt  # tokens actually decoded in prefill
    if start_ns is None:
        start_ns = result.t_start_ns
    tel = compute_telemetry(
        start_ns=start_ns, prefill_end_ns=result.t_prefill_end_ns,
        token_times_ns=result.token_ns, chunk_times_ns=result.chunk_ns,
        end_ns=result.t_end_ns, prompt_tokens=prompt_tokens,
        prefilled_tokens=prefilled)
    queued_ms = max(0.0, (result.t_start_ns - result.t_submit_ns) / 1e6)
    output = GenerationOutput(
        text=text,
        tokens_generated=len(result.tokens),
        generation_time_ms=tel.generation_time_ms,
        tokens_per_second=tel.tokens_per_second,
        finish_reason=finish_reason,
        ttft_ms=tel.ttft_ms,
        mean_itl_ms=tel.mean_itl_ms,
        p95_itl_ms=tel.p95_itl_ms,
        emitted_chunks=tel.emitted_chunks,
        inter_chunk_ms=tel.inter_chunk_ms,
        decode_tps=tel.decode_tps,
        prefill_tps=tel.prefill_tps,
        prompt_tokens=prompt_tokens,
        cached_prompt_tokens=prompt_tokens - prefilled,
        media_tokens=prepared.media_tokens,
        stop_reason=result.stop_reason,
        token_ids=tuple(result.tokens),
        tool_calls=tool_calls,
        thinking=thinking,
        queued_ms=queued_ms,
    )
    output = attach_logprobs(output, result)
    record_on_current_span(output)
    return output
