"""The streaming contract of LlmBackend: generate_streaming, stream, astream.

On LlamaCppBackend with Gemma 3 270M (real pieces), and on the base class's
one-piece fallback, exercised through a backend that implements only the
abstract methods (it delegates ``generate`` to a real LlamaCppBackend, so the
fallback is checked against real output).

How text is split into pieces depends on how quickly the consumer reads (each
piece holds everything released since the previous one), so the comparisons
are on the concatenated text and on the terminal piece, never on the split.
Each run starts from a cleared cache, so every call computes exactly the same
thing (see the note in test_backend_llamacpp.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from xybrid.backend import LlmBackend
from xybrid.errors import InvalidInputError, ModelNotLoadedError
from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig, PartialToken

POEM = [ChatMessage.user("Write a short poem about the sea.")]
COUNT = [ChatMessage.user("Count: 1, 2, 3, 4, 5,")]


class Boom(Exception):
    pass


def collect_async(backend: LlmBackend, messages: Sequence[object],
                  config: GenerationConfig | None) -> list[PartialToken]:
    async def run() -> list[PartialToken]:
        return [piece async for piece in backend.astream(messages, config)]  # type: ignore[arg-type]

    return asyncio.run(run())


def check_pieces(pieces: list[PartialToken], out: GenerationOutput) -> None:
    """The streaming contract, against the equivalent generate() result."""
    assert pieces, "a stream always ends with a terminal piece"
    assert [p.index for p in pieces] == list(range(len(pieces)))
    terminal = [p for p in pieces if p.finish_reason is not None]
    assert len(terminal) == 1 and terminal[0] is pieces[-1]
    final = pieces[-1]
    assert final.is_final and final.text == ""
    assert final.finish_reason == out.finish_reason
    body = pieces[:-1]
    cumulative = ""
    for p in body:
        assert p.text, "only the terminal piece may be empty"
        assert not p.is_final
        assert p.cumulative_text == cumulative + p.text  # grows monotonically
        cumulative = p.cumulative_text
    streamed = "".join(p.text for p in body)
    assert streamed == cumulative
    # The terminal piece carries the finished reply: the streamed text with
    # the surrounding whitespace trimmed, exactly generate()'s text.
    assert final.cumulative_text == out.text
    assert streamed.strip() == out.text
    # ... and the whole output, token ids and telemetry included.
    assert final.output is not None
    assert final.output.text == out.text and final.output.token_ids == out.token_ids
    assert final.output.finish_reason == out.finish_reason


@pytest.mark.parametrize("case", ["length", "stop"])
def test_streaming_contract(gemma_backend: LlamaCppBackend, case: str) -> None:
    b = gemma_backend
    if case == "length":
        messages, cfg = POEM, GenerationConfig.greedy(max_tokens=12)
    else:
        messages, cfg = COUNT, GenerationConfig.greedy(max_tokens=16, stop_sequences=["3\n"])
    out = b.generate(messages, cfg)
    assert out.finish_reason == case

    b.reset_cache()
    via_callback: list[PartialToken] = []
    streamed_out = b.generate_streaming(messages, cfg, via_callback.append)
    check_pieces(via_callback, out)
    assert streamed_out.text == out.text
    assert streamed_out.token_ids == out.token_ids
    assert streamed_out.finish_reason == out.finish_reason

    b.reset_cache()
    via_iterator = list(b.stream(messages, cfg))
    check_pieces(via_iterator, out)
    # Iterator pieces name the last token of their chunk.
    assert all(p.token_id in out.token_ids for p in via_iterator[:-1] if p.token_id is not None)

    b.reset_cache()
    via_async = collect_async(b, messages, cfg)
    check_pieces(via_async, out)

    # The three forms agree on the text and on the terminal piece.
    for pieces in (via_iterator, via_async):
        a, c = pieces[-1], via_callback[-1]
        assert (a.text, a.cumulative_text, a.finish_reason) == (c.text, c.cumulative_text,
                                                                c.finish_reason)
        assert "".join(p.text for p in pieces) == "".join(p.text for p in via_callback)


def test_stream_is_lazy_but_validates_eagerly(gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    with pytest.raises(InvalidInputError):
        b.stream([], GenerationConfig.greedy(max_tokens=4))
    it = b.stream(POEM, GenerationConfig.greedy(max_tokens=4))
    # Nothing has run yet: the cache is untouched until the first next().
    assert b.last_cached_prefix_len() is None
    pieces = list(it)
    assert pieces[-1].finish_reason == "length"
    assert b.last_cached_prefix_len() == 0


def test_astream_early_exit_leaves_the_backend_usable(tiny_llama_path: Path) -> None:
    cfg = GenerationConfig.greedy(max_tokens=64)
    msgs = [ChatMessage.user("Hello there")]
    config = LlmConfig(tiny_llama_path, context_length=512, n_threads=1, chat_template="chatml")
    with LlamaCppBackend(config) as b, LlamaCppBackend(config) as ref:
        expected = ref.generate(msgs, cfg)

        async def first_piece() -> PartialToken:
            async for piece in b.astream(msgs, cfg):
                return piece
            raise AssertionError("no piece")

        piece = asyncio.run(first_piece())
        assert piece.index == 0
        # Whether the generation was cut short or had finished, the next call is right.
        b.reset_cache()
        again = b.generate(msgs, cfg)
        assert again.token_ids == expected.token_ids and again.text == expected.text


def test_astream_propagates_errors(gemma_backend: LlamaCppBackend) -> None:
    with pytest.raises(InvalidInputError):
        collect_async(gemma_backend, [{"role": "robot", "content": "x"}], None)
    too_long = [ChatMessage.user(" a" * 1100)]
    from xybrid.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError):
        collect_async(gemma_backend, too_long, GenerationConfig.greedy(max_tokens=4))
    # Still usable.
    out = collect_async(gemma_backend, POEM, GenerationConfig.greedy(max_tokens=4))
    assert out[-1].finish_reason == "length"


# ---------------------------------------------------------------------------
# the base class's fallback for backends that cannot stream
# ---------------------------------------------------------------------------


class OneShotBackend(LlmBackend):
    """Implements only the abstract methods; generation is delegated to a real
    backend, so the inherited streaming forms run over real replies."""

    def __init__(self, inner: LlamaCppBackend) -> None:
        self.inner = inner
        self.loaded = True
        self.calls = 0

    @property
    def name(self) -> str:
        return "one-shot"

    def load(self, config: LlmConfig) -> None:
        self.loaded = True

    @property
    def is_loaded(self) -> bool:
        return self.loaded

    def unload(self) -> None:
        self.loaded = False

    def generate(self, messages, config=None):  # type: ignore[no-untyped-def]
        if not self.loaded:
            raise ModelNotLoadedError("not loaded")
        self.calls += 1
        self.inner.reset_cache()
        return self.inner.generate(messages, config)

    def generate_raw(self, prompt, config=None):  # type: ignore[no-untyped-def]
        self.inner.reset_cache()
        return self.inner.generate_raw(prompt, config)


def test_default_fallback_emits_one_final_piece(gemma_backend: LlamaCppBackend) -> None:
    b = OneShotBackend(gemma_backend)
    assert b.supports_streaming is False
    assert b.wire_label is None and b.supported_formats == ()
    assert b.memory_usage() is None and b.context_length() is None
    assert b.last_cached_prefix_len() is None
    cfg = GenerationConfig.greedy(max_tokens=8)
    gemma_backend.reset_cache()
    reference = gemma_backend.generate(POEM, cfg)

    pieces: list[PartialToken] = []
    out = b.generate_streaming(POEM, cfg, pieces.append)
    assert out.text == reference.text and out.token_ids == reference.token_ids
    assert len(pieces) == 1
    (piece,) = pieces
    assert piece.text == piece.cumulative_text == out.text
    assert piece.index == 0
    assert piece.finish_reason == out.finish_reason == "length"
    assert piece.is_final

    assert list(b.stream(POEM, cfg)) == pieces
    assert collect_async(b, POEM, cfg) == pieces

    # Returning False cannot stop a reply that is already complete.
    out2 = b.generate_streaming(POEM, cfg, lambda p: False)
    assert out2.text == out.text and out2.finish_reason == "length"


def test_default_fallback_errors_propagate(gemma_backend: LlamaCppBackend) -> None:
    b = OneShotBackend(gemma_backend)
    cfg = GenerationConfig.greedy(max_tokens=4)
    boom = Boom()

    def raising(piece: PartialToken) -> None:
        raise boom

    with pytest.raises(Boom) as info:
        b.generate_streaming(POEM, cfg, raising)
    assert info.value is boom
    # Errors of generate() come out of every streaming form unchanged.
    with pytest.raises(InvalidInputError):
        list(b.stream([], cfg))
    with pytest.raises(InvalidInputError):
        collect_async(b, [], cfg)
    # Closing the fallback stream early is harmless.
    it = b.stream(POEM, cfg)
    assert next(it).is_final
    it.close()
    # The context manager unloads.
    with b as entered:
        assert entered is b and b.is_loaded
    assert not b.is_loaded
    with pytest.raises(ModelNotLoadedError):
        list(b.stream(POEM, cfg))


def test_calling_the_backend_inside_its_own_stream_is_an_error_not_a_hang(
        tiny_llama_path) -> None:  # type: ignore[no-untyped-def]
    from xybrid import ChatMessage, GenerationConfig, LlamaCppBackend, LlmConfig, XybridError

    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=256, n_threads=1,
                                   chat_template="chatml")) as llm:
        config = GenerationConfig.greedy(max_tokens=8)
        stream = llm.stream([ChatMessage.user("hi")], config)
        next(stream)
        with pytest.raises(XybridError, match="already running"):
            llm.generate([ChatMessage.user("again")], config)
        stream.close()
        assert llm.generate([ChatMessage.user("again")], config).tokens_generated >= 1


def test_raw_prompts_as_text_or_token_ids_streamed_or_not(gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    prompt = ", ".join(str(i) for i in range(1, 30)) + ","  # > 32 tokens: its prefix can be reused
    ids = b.model.tokenize(prompt, add_special=True, parse_special=True)
    cfg = GenerationConfig.greedy(max_tokens=10)
    b.reset_cache()
    out = b.generate_raw(prompt, cfg)
    assert out.text.startswith(" ")  # raw: verbatim, nothing trimmed
    b.reset_cache()
    by_ids = b.generate_raw(ids, cfg)
    assert (by_ids.text, by_ids.token_ids, by_ids.prompt_tokens) == (out.text, out.token_ids, len(ids))

    b.reset_cache()
    via_callback: list[PartialToken] = []
    streamed_out = b.generate_raw(tuple(ids), cfg, on_token=via_callback.append)
    b.reset_cache()
    via_iterator = list(b.stream_raw(ids, cfg))
    for pieces in (via_callback, via_iterator):
        final = pieces[-1]
        assert final.finish_reason == "length" and final.text == ""
        assert "".join(p.text for p in pieces) == final.cumulative_text == out.text
        assert final.output is not None and final.output.token_ids == out.token_ids
    assert streamed_out.token_ids == out.token_ids

    # Token-id prompts share the prefix cache like any other.
    longer = ids + b.model.tokenize(out.text, add_special=False)
    again = b.generate_raw(longer, cfg)
    assert again.cached_prompt_tokens == len(ids) // 32 * 32 > 0


@pytest.mark.parametrize("bad, names", [
    ([], "empty"),
    ([2, 10**9], "token 1"),
    ([2, -1], "token 1"),
    ([2, True], "token 1"),
    ([2, 3.0], "token 1"),
    (b"bytes", "bytes"),
    (42, "int"),
])
def test_bad_raw_prompts_are_refused_clearly(gemma_backend: LlamaCppBackend, bad: object,
                                             names: str) -> None:
    b = gemma_backend
    cfg = GenerationConfig.greedy(max_tokens=2)
    with pytest.raises(InvalidInputError, match=names):
        b.generate_raw(bad, cfg)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=names):
        list(b.stream_raw(bad, cfg))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="on_token"):
        b.generate_raw("Hi", cfg, on_token="not callable")  # type: ignore[arg-type]
    assert b.generate_raw("Hi", cfg).tokens_generated == 2  # still usable
