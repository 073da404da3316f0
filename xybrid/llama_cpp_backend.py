"""LlamaCppBackend: the llama.cpp engine behind the :class:`LlmBackend` interface.

One backend owns one model and one context. Calls are serialised by a lock
(the native loop runs with the GIL released, so other Python threads keep
running while a call waits or generates).

Multi-turn reuse: the backend remembers exactly which tokens sit in the KV
cache (prompt plus the generated tokens that were decoded). The next call
keeps the longest common prefix (capped one short of the new prompt, so at
least one token is decoded to produce logits) and decodes only the rest.
Recurrent and hybrid models, whose state cannot be cut back to a position,
and calls that would overflow the window start from an empty cache instead.
A failed or cancelled call leaves the cache in an unknown state, so it is
cleared before the error reaches the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xybrid._native import _engine
from xybrid.backend import LlmBackend, MessageLike, StreamingCallback
from xybrid.chat_templates import ChatTemplate, resolve_chat_template
from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    IntegrityError,
    InvalidInputError,
    ModelNotLoadedError,
    UnsupportedInputError,
)
from xybrid.grammar import json_schema_to_gbnf, response_format_to_grammar, validate_grammar
from xybrid.logprobs import attach_logprobs
from xybrid.media import Audio, Image, audio_to_item, image_to_rgb
from xybrid.model_files import resolve_model_path
from xybrid.prefix_cache import PrefixCacheState, PrefixPlan
from xybrid.session_state import (
    SessionState,
    capture_state,
    model_fingerprint,
    read_session_file,
    restore_state,
    write_session_file,
)
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
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig, PartialToken

__all__ = [
    "Capabilities",
    "LlamaCppBackend",
    "ToolCallError",
    "execution_provider",
    "sha256_file",
    "verify_sha256",
]


class ToolCallError(GenerationError):
    """The model started a tool call that does not parse; ``raw`` holds its text."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw

_SEQ = 0  # the backend drives one sequence of its context
# Reused prefixes end on a multiple of this, so a cached run decodes with the
# same row grouping as a fresh one and gives identical results.
_PREFIX_ALIGN = 32


def execution_provider() -> str:
    """Where this build runs the model: ``"cuda"``, ``"metal"`` or ``"cpu"``."""
    from xybrid import _build_info

    if _build_info.CUDA:
        return "cuda"
    import sys

    return "metal" if sys.platform == "darwin" else "cpu"


@dataclass
class _Loaded:
    config: LlmConfig
    path: Path
    model: Any  # _engine.Model
    context: Any  # _engine.Context
    template: ChatTemplate
    bos_text: str
    multimodal: Any = None  # _engine.Multimodal when an mmproj is loaded


@dataclass
class _Prepared:
    """A prompt ready for the engine: its tokens and the cache plan."""

    tokens: list[int]
    plan: PrefixPlan
    stops: tuple[str, ...]
    chat: bool
    media_tokens: int = 0
    n_prompt: int = 0  # prompt positions, media included
    start_ns: int | None = None  # when media evaluation began
    tool_names: tuple[str, ...] = ()  # tools offered to the model (empty: none)


class _PieceStream:
    """Turns the engine's raw chunks into the text a user sees: reasoning
    and chat stop markers removed (StreamingTextFilter) and, when tools are
    offered, tool-call markup held out of the text (ToolCallParser)."""

    def __init__(self, prepared: _Prepared) -> None:
        self.filter = _filter_for(prepared)
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


@dataclass(frozen=True)
class Capabilities:
    """What the loaded model and this build can do."""

    model_label: str
    vision: bool
    audio: bool
    audio_sample_rate: int | None
    embeddings: bool
    tools: bool
    thinking: bool
    accelerator: str
    gpu_layers: int
    devices: tuple[str, ...] = field(default=())


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (large models stay out of memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`IntegrityError` unless the file's SHA-256 is ``expected``.

    The comparison is constant-time, so a digest cannot be probed byte by byte.
    """
    actual = sha256_file(path)
    if not hmac.compare_digest(actual.encode(), expected.lower().encode()):
        raise IntegrityError(
            f"{path}: SHA-256 mismatch (expected {expected.lower()}, got {actual}); "
            "refusing to load a file that is not the one you asked for")


class LlamaCppBackend(LlmBackend):
    """Run GGUF models with llama.cpp.

    ``LlamaCppBackend(config)`` loads at once; ``LlamaCppBackend()`` waits for
    :meth:`load`. Use it as a context manager to unload on exit::

        with LlamaCppBackend(LlmConfig("model.gguf")) as llm:
            out = llm.generate([ChatMessage.user("Hi!")], GenerationConfig(max_tokens=32))
    """

    def __init__(self, config: LlmConfig | None = None) -> None:
        # Re-entrant: a call made from inside this backend's own stream loop
        # (same thread) then fails fast with "a generation is already running"
        # instead of waiting for a lock its own thread holds.
        self._lock = threading.RLock()
        self._loaded: _Loaded | None = None
        self._cache = PrefixCacheState()
        if config is not None:
            self.load(config)

    # --- identity -------------------------------------------------------------
    @property
    def name(self) -> str:
        return "llama-cpp"

    @property
    def supported_formats(self) -> tuple[str, ...]:
        return ("gguf",)

    @property
    def wire_label(self) -> str | None:
        return "llamacpp"

    @property
    def execution_provider(self) -> str:
        return execution_provider()

    # --- lifecycle ---------------------------------------------------------------
    def load(self, config: LlmConfig) -> None:
        if not isinstance(config, LlmConfig):
            raise InvalidInputError(f"load() needs an LlmConfig, got {type(config).__name__}")
        path = resolve_model_path(config.model_path)
        if config.model_sha256:
            verify_sha256(path, config.model_sha256)
        mmproj = None
        if config.mmproj_path is not None:
            mmproj = resolve_model_path(config.mmproj_path)
            if config.mmproj_sha256:
                verify_sha256(mmproj, config.mmproj_sha256)
        elif config.mmproj_sha256:
            raise InvalidInputError("LlmConfig.mmproj_sha256 is set but mmproj_path is not")
        model = _engine.Model(str(path), gpu_layers=config.gpu_layers, use_mmap=config.use_mmap)
        multimodal = None
        try:
            if mmproj is not None:
                multimodal = _engine.Multimodal(model, str(mmproj), n_threads=config.n_threads,
                                                use_gpu=config.gpu_layers != 0,
                                                flash_attn=config.flash_attn)
            context = _engine.Context(
                model,
                n_ctx=config.context_length,
                n_batch=config.n_batch,
                n_ubatch=config.n_ubatch,
                n_threads=config.n_threads,
                flash_attn=config.flash_attn,
            )
        except BaseException:
            if multimodal is not None:
                multimodal.close()
            model.close()
            raise
        bos_text = model.token_text(model.bos_token) if model.bos_token >= 0 else ""
        eos_text = model.token_text(model.eos_token) if model.eos_token >= 0 else ""
        template = resolve_chat_template(
            config.chat_template, model.chat_template(), model.architecture,
            bos_token=bos_text, eos_token=eos_text)
        with self._lock:
            previous, self._loaded = self._loaded, _Loaded(
                config, path, model, context, template, bos_text, multimodal)
            self._cache.reset()
        if previous is not None:
            _free(previous)

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def unload(self) -> None:
        with self._lock:
            previous, self._loaded = self._loaded, None
            self._cache.reset()
        if previous is not None:
            _free(previous)

    def _require(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            raise ModelNotLoadedError("no model is loaded: call load(LlmConfig(...)) first")
        return loaded

    # --- facts ----------------------------------------------------------------------
    @property
    def supports_streaming(self) -> bool:
        return True

    @property
    def model_path(self) -> Path | None:
        return self._loaded.path if self._loaded else None

    @property
    def chat_template_name(self) -> str | None:
        """Which template formats chat prompts (``"gemma"``, ``"jinja:model"``, ...)."""
        return self._loaded.template.name if self._loaded else None

    @property
    def model(self) -> Any:
        """The native :class:`xybrid._native._engine.Model` (tokenizer, metadata)."""
        return self._require().model

    def context_length(self) -> int | None:
        # The window llama.cpp actually made (it rounds the requested size up,
        # e.g. 100 -> 256), which is also the one the overflow checks use.
        loaded = self._loaded
        return int(loaded.context.n_ctx) if loaded else None

    @property
    def model_label(self) -> str:
        """GGUF ``general.name``, else the file name without extension."""
        loaded = self._require()
        return str(loaded.model.name or loaded.path.stem)

    def capabilities(self) -> Capabilities:
        """Vision/audio (from the projector), embeddings, tools and thinking
        (from the chat template), and where the model runs."""
        loaded = self._require()
        mm = loaded.multimodal
        source = getattr(loaded.template, "source", "") or ""
        n_layer = int(loaded.model.n_layer)
        wanted = loaded.config.gpu_layers
        offloaded = 0
        if _engine.supports_gpu_offload():
            offloaded = n_layer + 1 if wanted < 0 else min(wanted, n_layer + 1)
        return Capabilities(
            model_label=self.model_label,
            vision=bool(mm is not None and mm.vision),
            audio=bool(mm is not None and mm.audio),
            audio_sample_rate=mm.audio_sample_rate if mm is not None else None,
            embeddings=True,
            tools="tools" in source,
            thinking="<think>" in source or "enable_thinking" in source,
            accelerator=execution_provider(),
            gpu_layers=offloaded,
            devices=tuple(d["description"] for d in _engine.devices()),
        )

    def memory_usage(self) -> int | None:
        """Bytes of weights plus the context's state (KV cache), from llama.cpp."""
        with self._lock:
            loaded = self._loaded
            if loaded is None:
                return None
            return int(loaded.model.size) + int(loaded.context.state_size)

    def last_cached_prefix_len(self) -> int | None:
        return self._cache.last_prefix_hit

    def cancel(self) -> bool:
        """Stop the running generation (from any thread). It returns with
        finish_reason "cancelled"; the KV cache is cleared. False when idle."""
        loaded = self._loaded
        return bool(loaded is not None and loaded.context.cancel())

    def reset_cache(self) -> None:
        """Forget the conversation held in the KV cache."""
        with self._lock:
            loaded = self._require()
            loaded.context.memory_clear()
            self._cache.reset()

    # --- prompt preparation --------------------------------------------------------
    def format_chat(self, messages: Sequence[MessageLike], *, tools: Any = None) -> str:
        """The prompt text the chat template makes of ``messages``."""
        loaded = self._require()
        return loaded.template.render(_as_messages(messages), add_generation_prompt=True,
                                      tools=tools)

    def _tokenize_chat(self, loaded: _Loaded, prompt: str) -> list[int]:
        tokens: list[int] = loaded.model.tokenize(prompt, add_special=True, parse_special=True)
        # Templates that write the BOS text themselves would otherwise get a
        # second BOS from the tokenizer.
        bos = loaded.model.bos_token
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]
        return tokens

    def _prepare(self, loaded: _Loaded, tokens: list[int], config: GenerationConfig,
                 chat: bool) -> _Prepared:
        if not tokens:
            raise InvalidInputError("the prompt is empty")
        n_ctx = loaded.context.n_ctx
        if len(tokens) >= n_ctx:
            raise ContextOverflowError(
                f"input too long: {len(tokens)} tokens do not fit the context window of "
                f"{n_ctx} tokens; shorten the prompt or the conversation history")
        exact = loaded.config.prefix_reuse == "exact"
        plan = self._cache.plan(tokens, config.max_tokens, n_ctx, loaded.model.has_recurrent_state,
                                align=_PREFIX_ALIGN if exact else 1)
        stops = (merge_stop_patterns(config.stop_sequences, CHAT_STOP_PATTERNS) if chat
                 else tuple(config.stop_sequences))
        return _Prepared(tokens, plan, stops, chat)

    def _prepare_chat(self, loaded: _Loaded, msgs: list[ChatMessage],
                      config: GenerationConfig) -> _Prepared:
        tools = _offered_tools(config)
        template_tools: list[dict[str, Any]] | None = None
        if tools:
            msgs, template_tools = _with_tool_prompt(loaded.template, msgs, tools)
        if not any(m.media for m in msgs):
            prompt = loaded.template.render(msgs, add_generation_prompt=True, tools=template_tools)
            prepared = self._prepare(loaded, self._tokenize_chat(loaded, prompt), config, chat=True)
        else:
            prepared = self._prepare_multimodal(loaded, msgs, config, template_tools)
        prepared.tool_names = tuple(t["function"]["name"] for t in tools)
        return prepared

    def _prepare_multimodal(self, loaded: _Loaded, msgs: list[ChatMessage],
                            config: GenerationConfig,
                            tools: list[dict[str, Any]] | None) -> _Prepared:
        """Render the media markers into the prompt, then tokenize and
        evaluate text and media through mtmd. Media prompts always start
        from an empty cache: their positions do not map to token ids."""
        mm = loaded.multimodal
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
                    items.append(audio_to_item(item))
                markers += mm.marker + "\n"
            rendered.append(ChatMessage(m.role, markers + m.content, m.name, m.tool_call_id))
        prompt = loaded.template.render(rendered, add_generation_prompt=True, tools=tools)
        if loaded.bos_text and prompt.startswith(loaded.bos_text):
            prompt = prompt[len(loaded.bos_text):]  # mtmd adds the BOS itself
        start_ns = _engine.monotonic_ns()
        chunks = mm.tokenize(prompt, items)
        n_ctx = loaded.context.n_ctx
        if chunks.n_pos >= n_ctx:
            raise ContextOverflowError(
                f"input too long: the prompt with its media takes {chunks.n_pos} positions, "
                f"more than the context window of {n_ctx}")
        loaded.context.memory_clear()
        self._cache.reset()
        try:
            n_past = loaded.context.eval_chunks(mm, chunks, 0, _SEQ)
        except BaseException:
            self._forget(loaded)
            raise
        stops = merge_stop_patterns(config.stop_sequences, CHAT_STOP_PATTERNS)
        plan = PrefixPlan(keep=n_past, tail=[], full_clear=False)
        media = sum(chunks.media_tokens().values())
        return _Prepared([], plan, stops, True, media_tokens=media, n_prompt=chunks.n_tokens,
                         start_ns=start_ns)

    def _apply_plan(self, loaded: _Loaded, prepared: _Prepared) -> tuple[list[int], int]:
        plan = prepared.plan
        if prepared.start_ns is not None:  # multimodal: already evaluated
            return [], plan.keep
        if plan.full_clear or not loaded.context.seq_rm(_SEQ, plan.keep, -1):
            loaded.context.memory_clear()
            return prepared.tokens, 0
        return plan.tail, plan.keep

    # --- generation ------------------------------------------------------------------
    def generate(self, messages: Sequence[MessageLike],
                 config: GenerationConfig | None = None) -> GenerationOutput:
        return self._run_chat(messages, config, None)

    def generate_streaming(self, messages: Sequence[MessageLike], config: GenerationConfig | None,
                           on_token: StreamingCallback) -> GenerationOutput:
        if not callable(on_token):
            raise InvalidInputError("on_token must be callable")
        return self._run_chat(messages, config, on_token)

    def generate_raw(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                     on_token: StreamingCallback | None = None) -> GenerationOutput:
        """Continue ``prompt`` verbatim: no template, and only
        ``config.stop_sequences`` stop it. The text is returned exactly as
        generated, leading space included.

        ``prompt`` is text (BOS added, special markers parsed) or a sequence
        of token ids used as they are, for callers that tokenize themselves.
        With ``on_token`` the pieces are streamed to it as they are made.
        """
        config = _config(config)
        if on_token is not None and not callable(on_token):
            raise InvalidInputError("on_token must be callable")
        with self._lock:
            loaded = self._require()
            prepared = self._prepare_raw(loaded, prompt, config)
            return self._execute(loaded, prepared, config, on_token)

    def stream(self, messages: Sequence[MessageLike],
               config: GenerationConfig | None = None) -> Iterator[PartialToken]:
        """Yield the reply as it is generated, then a final empty piece with
        ``finish_reason``. Closing the generator early cancels the generation
        (the KV cache is cleared, as after any cancelled call)."""
        config = _config(config)
        msgs = _as_messages(messages)
        return self._stream(lambda loaded: self._prepare_chat(loaded, msgs, config), config)

    def stream_raw(self, prompt: str | Sequence[int],
                   config: GenerationConfig | None = None) -> Iterator[PartialToken]:
        """:meth:`stream` for a raw prompt (text or token ids, as for
        :meth:`generate_raw`)."""
        config = _config(config)
        _check_raw_prompt(prompt)
        return self._stream(lambda loaded: self._prepare_raw(loaded, prompt, config), config)

    def _prepare_raw(self, loaded: _Loaded, prompt: str | Sequence[int],
                     config: GenerationConfig) -> _Prepared:
        _check_raw_prompt(prompt)
        if isinstance(prompt, str):
            tokens = loaded.model.tokenize(prompt, add_special=True, parse_special=True)
        else:
            tokens = list(prompt)
            n_vocab = loaded.model.n_vocab
            for i, t in enumerate(tokens):
                if not 0 <= t < n_vocab:
                    raise InvalidInputError(
                        f"prompt token {i} = {t} is not a token id of this model (0..{n_vocab - 1})")
        return self._prepare(loaded, tokens, config, chat=False)

    def _stream(self, prepare: Callable[[_Loaded], _Prepared],
                config: GenerationConfig) -> Iterator[PartialToken]:
        """The generator behind :meth:`stream` and :meth:`stream_raw`. It holds
        the lock from the first ``next()`` until it is exhausted or closed."""
        with self._lock:
            loaded = self._require()
            prepared = prepare(loaded)
            tail, n_past = self._apply_plan(loaded, prepared)
            sampler = _sampler(loaded.model, config)
            gen = loaded.context.stream(tail, sampler, max_tokens=config.max_tokens,
                                        n_past=n_past, seq_id=_SEQ, stop=prepared.stops or None,
                                        logits_ready=not tail,
                                        render_special=bool(prepared.tool_names),
                                        logprobs=config.logprobs)
            pieces = _PieceStream(prepared)
            index = 0
            finished = False
            try:
                for chunk in gen:
                    safe = pieces.push(chunk)
                    if safe:
                        n = gen.tokens_at_last_chunk
                        yield PartialToken(safe, index, pieces.cumulative,
                                           gen.token_at(n - 1) if n else None)
                        index += 1
                tail_text = pieces.finish()
                if tail_text:
                    yield PartialToken(tail_text, index, pieces.cumulative)
                    index += 1
                finished = True
            finally:
                if not finished:
                    gen.close()
                    self._forget(loaded)
            output = self._finish(loaded, prepared, config, gen.result, n_past)
            yield PartialToken("", index, output.text, None, output.finish_reason,
                               output.tool_calls, output)

    def _run_chat(self, messages: Sequence[MessageLike], config: GenerationConfig | None,
                  on_token: StreamingCallback | None) -> GenerationOutput:
        config = _config(config)
        msgs = _as_messages(messages)
        with self._lock:
            loaded = self._require()
            prepared = self._prepare_chat(loaded, msgs, config)
            return self._execute(loaded, prepared, config, on_token)

    def _execute(self, loaded: _Loaded, prepared: _Prepared, config: GenerationConfig,
                 on_token: StreamingCallback | None) -> GenerationOutput:
        """Run the engine (lock held) and build the output."""
        tail, n_past = self._apply_plan(loaded, prepared)
        sampler = _sampler(loaded.model, config)
        pieces = _PieceStream(prepared)
        on_text: Callable[[str], object] | None = None
        index = 0
        if on_token is not None:
            def on_text(chunk: str) -> object:
                nonlocal index
                safe = pieces.push(chunk)
                if not safe:
                    return None
                piece = PartialToken(safe, index, pieces.cumulative)
                index += 1
                return on_token(piece)
        try:
            result = loaded.context.generate(tail, sampler, max_tokens=config.max_tokens,
                                             n_past=n_past, seq_id=_SEQ,
                                             stop=prepared.stops or None, on_text=on_text,
                                             logits_ready=not tail,
                                             render_special=bool(prepared.tool_names),
                                             logprobs=config.logprobs)
        except BaseException:
            self._forget(loaded)
            raise
        if on_token is not None and result.stop_reason != "cancelled":
            rest = pieces.finish()
            if rest:
                on_token(PartialToken(rest, index, pieces.cumulative))
                index += 1
        output = self._finish(loaded, prepared, config, result, n_past)
        if on_token is not None:
            on_token(PartialToken("", index, output.text, None, output.finish_reason,
                                  output.tool_calls, output))
        return output

    def _forget(self, loaded: _Loaded) -> None:
        """After a failed or cancelled run nothing in the cache can be trusted."""
        loaded.context.memory_clear()
        self._cache.reset()

    def _finish(self, loaded: _Loaded, prepared: _Prepared, config: GenerationConfig,
                result: Any, n_past: int) -> GenerationOutput:
        """Record the cache, clean the text, derive finish reason and telemetry."""
        if result.stop_reason == "cancelled" or prepared.start_ns is not None:
            # Cancelled: the cache is in an unknown state. Multimodal: its
            # positions do not correspond to token ids, so nothing can be reused.
            self._forget(loaded)
        else:
            # prefix_reuse="exact" records only the prompt. The generated tokens
            # are in the cache too, but they were decoded one at a time, and
            # their values differ slightly from a batched prefill of the same
            # tokens; reusing them would make the next turn differ from a fresh
            # run. seq_rm drops them when the next call keeps a prefix.
            cached = prepared.tokens
            if loaded.config.prefix_reuse == "longest":
                # The reply tokens that went through llama_decode (not the
                # last one sampled) are in the cache after the prompt.
                cached = cached + list(result.tokens[:result.n_past - len(cached)])
            self._cache.commit(cached, n_past)
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
        prompt_tokens = len(prepared.tokens) or prepared.n_prompt
        prefilled = result.n_prompt  # tokens actually decoded in prefill
        start_ns = result.t_start_ns
        if prepared.start_ns is not None:  # media prompt: evaluated before the loop
            prefilled, start_ns = prepared.n_prompt, prepared.start_ns
        tel = compute_telemetry(
            start_ns=start_ns, prefill_end_ns=result.t_prefill_end_ns,
            token_times_ns=result.token_ns, chunk_times_ns=result.chunk_ns,
            end_ns=result.t_end_ns, prompt_tokens=prompt_tokens,
            prefilled_tokens=prefilled)
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
        )
        output = attach_logprobs(output, result)
        record_on_current_span(output)
        return output

    # --- session state (see xybrid.session_state) -------------------------------------
    def save_state(self) -> SessionState:
        """The conversation held in the KV cache, to restore with :meth:`load_state`."""
        with self._lock:
            loaded = self._require()
            return capture_state(model_fingerprint(loaded.model, loaded.path), loaded.context,
                                 self._cache, _SEQ)

    def load_state(self, state: SessionState) -> None:
        """Put a saved conversation back into the KV cache; the next call
        continues exactly as it would have on the backend that saved it.
        A state from another model raises :class:`SessionStateError`."""
        with self._lock:
            loaded = self._require()
            restore_state(state, model_fingerprint(loaded.model, loaded.path), loaded.context,
                          self._cache, _SEQ)

    def save_session(self, path: str | Path) -> None:
        """:meth:`save_state` into a file."""
        write_session_file(path, self.save_state())

    def load_session(self, path: str | Path) -> None:
        """:meth:`load_state` from a file written by :meth:`save_session`."""
        self.load_state(read_session_file(path))


def _free(loaded: _Loaded) -> None:
    if loaded.multimodal is not None:
        loaded.multimodal.close()
    loaded.context.close()
    loaded.model.close()


def _config(config: GenerationConfig | None) -> GenerationConfig:
    if config is None:
        return GenerationConfig()
    if not isinstance(config, GenerationConfig):
        raise InvalidInputError(f"config must be a GenerationConfig, got {type(config).__name__}")
    return config


def _check_raw_prompt(prompt: object) -> None:
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


def _as_messages(messages: Sequence[MessageLike]) -> list[ChatMessage]:
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
            raise InvalidInputError(f"messages[{i}] must be a ChatMessage or a dict, got {type(m).__name__}")
    return out


def _sampler(model: Any, config: GenerationConfig) -> Any:
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
        grammar=_grammar_for(config),
    )


def _grammar_for(config: GenerationConfig) -> str | None:
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


def _offered_tools(config: GenerationConfig) -> list[dict[str, Any]]:
    if not config.tools or config.tool_choice == "none":
        return []
    return [spec.to_openai() for spec in validate_tools(list(config.tools))]


def _with_tool_prompt(
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


def _filter_for(prepared: _Prepared) -> StreamingTextFilter:
    """Chat replies hide reasoning blocks and stop at chat markers; raw
    continuations pass through untouched (the engine already cut at the
    caller's stop sequences)."""
    if prepared.chat:
        return StreamingTextFilter(prepared.stops)
    return StreamingTextFilter((), strip_thinking=False)
