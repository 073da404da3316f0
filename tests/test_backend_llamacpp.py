"""LlamaCppBackend on the real extension with real models.

Two kinds of model are used:

* Gemma 3 270M (the default model; a base model without a chat template, so
  the Gemma fallback formatter is used) wherever the text must mean something:
  templates, stop sequences, reasoning tags, telemetry.
* Tiny random-weight GGUF models (llama, and the recurrent Mamba and hybrid
  LFM2) wherever only the machinery matters: the KV-cache bookkeeping, failure
  and cancellation paths, load errors.

A note on comparing outputs. On this CPU build llama.cpp is not batch
invariant for Gemma's Q4_K weights: a token's K/V vectors come out a little
different (up to ~0.5 in the final logits, measured) depending on where the
token sat in its decode batch, because rows handled by the 4-row GEMM tiles
and the left-over rows handled by GEMV round differently. A reply that reuses
a cached prefix can therefore differ from a full re-prefill when the base
model's greedy choice is a near tie. That is llama.cpp arithmetic, not cache
bookkeeping, so the exact "reuse == full re-prefill" comparisons run on the
tiny llama model (whose F16 kernels are batch invariant: bit-identical
logits, checked below), and the Gemma multi-turn test compares a conversation
whose answers are confident. Likewise a Gemma test that repeats a prompt and
wants the same output calls ``reset_cache()`` first.

Most tests here use ``prefix_reuse="exact"``, which keeps reused prefixes on a
multiple of ``_PREFIX_ALIGN`` tokens (32) to keep the row grouping of a cached
run equal to a fresh one, so the conversations start with a system prompt
long enough for that. The default, ``"longest"``, has tests of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xybrid.errors import (
    ContextOverflowError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotLoadedError,
    XybridError,
)
from xybrid.llama_cpp_backend import _PREFIX_ALIGN as ALIGN
from xybrid.llama_cpp_backend import LlamaCppBackend, execution_provider
from xybrid.streaming import CHAT_STOP_PATTERNS
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig

GREEDY = GenerationConfig.greedy

#: Over ALIGN tokens with any of the tokenizers used here.
LONG_SYSTEM = ("You are a careful and friendly assistant. You answer every question in short, "
               "plain sentences, you never make things up, and you say so when you do not know.")
GEO_SYSTEM = ("You are a careful and friendly geography assistant. You answer every question "
              "about countries, cities and rivers with the name of one city and nothing else, "
              "in plain text.")


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def aligned(n: int) -> int:
    """What the backend keeps of an n-token reusable prefix."""
    return n - n % ALIGN


def assert_reused(out: GenerationOutput, cached_prompt: list[int],
                  previous: GenerationOutput, prompt: list[int]) -> None:
    """``out`` (for ``prompt``) reused the cache left by ``previous`` (for
    ``cached_prompt``): at least the common part of the two prompts, at most
    what also matches the previous reply's tokens, on an ALIGN boundary."""
    limit = len(prompt) - 1
    low = aligned(min(common_prefix(cached_prompt, prompt), limit))
    high = aligned(min(common_prefix(list(cached_prompt) + list(previous.token_ids), prompt),
                       limit))
    assert out.prompt_tokens == len(prompt)
    assert 0 < low <= out.cached_prompt_tokens <= high
    assert out.cached_prompt_tokens % ALIGN == 0


class Boom(Exception):
    """Raised by test callbacks; must reach the caller unchanged."""


def tiny_config(path: Path, **kw: object) -> LlmConfig:
    kw.setdefault("context_length", 512)
    kw.setdefault("n_threads", 1)
    kw.setdefault("chat_template", "chatml")
    # The cache bookkeeping asserted here is the aligned, bit-identical mode;
    # "longest" has its own test.
    kw.setdefault("prefix_reuse", "exact")
    return LlmConfig(path, **kw)  # type: ignore[arg-type]


@pytest.fixture
def tiny(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as backend:
        yield backend


@pytest.fixture
def tiny_long(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    """Room for thousands of tokens: a generation that is cancelled at its
    first piece is still running then, however the threads are scheduled."""
    with LlamaCppBackend(tiny_config(tiny_llama_path, context_length=4096)) as backend:
        yield backend


LONG = 4000


@pytest.fixture
def tiny_ref(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    """A second backend over the same model: the fresh-cache reference."""
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as backend:
        yield backend


def fresh_output(ref: LlamaCppBackend, messages: list[ChatMessage],
                 config: GenerationConfig) -> GenerationOutput:
    ref.reset_cache()
    out = ref.generate(messages, config)
    assert out.cached_prompt_tokens == 0
    return out


def assert_same_reply(a: GenerationOutput, b: GenerationOutput) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.finish_reason == b.finish_reason


def chat_tokens(backend: LlamaCppBackend, messages: list[ChatMessage]) -> list[int]:
    return backend.model.tokenize(backend.format_chat(messages), add_special=True,
                                  parse_special=True)


# ---------------------------------------------------------------------------
# identity and facts
# ---------------------------------------------------------------------------


def test_identity_and_facts(gemma_backend: LlamaCppBackend, gemma_path: Path) -> None:
    b = gemma_backend
    assert b.name == "llama-cpp"
    assert b.wire_label == "llamacpp"
    assert b.supported_formats == ("gguf",)
    assert b.supports_streaming is True
    assert b.is_loaded
    assert b.model_path == gemma_path
    # A base model without a template in its metadata: the Gemma fallback.
    assert b.model.chat_template() is None
    assert b.chat_template_name == "gemma"
    assert b.context_length() == 1024
    assert b.execution_provider == execution_provider()
    from xybrid import _build_info

    assert b.execution_provider == ("cuda" if _build_info.CUDA else "cpu")
    size = os.path.getsize(gemma_path)
    mem = b.memory_usage()
    assert mem is not None and mem > size * 0.5
    # Weights plus a KV cache: more than the weights llama.cpp reports alone.
    assert mem > b.model.size


def test_context_length_is_the_window_actually_used(tiny_llama_path: Path) -> None:
    # llama.cpp rounds the context up (here 100 -> 256). context_length() must
    # report the window the overflow check and the engine really use.
    with LlamaCppBackend(tiny_config(tiny_llama_path, context_length=100)) as b:
        n_ctx = b.context_length()
        assert n_ctx is not None and n_ctx >= 100

        def prompt_of(n_tokens: int) -> str:
            # "a a a ...": BOS plus one token per word.
            text = " ".join(["a"] * (n_tokens - 1))
            assert len(b.model.tokenize(text, add_special=True, parse_special=True)) == n_tokens
            return text

        with pytest.raises(ContextOverflowError):
            b.generate_raw(prompt_of(n_ctx), GREEDY(max_tokens=1))
        out = b.generate_raw(prompt_of(n_ctx - 1), GREEDY(max_tokens=4))
        assert out.prompt_tokens == n_ctx - 1
        # One position was left: the first token's logits come from the prompt,
        # it is decoded into the last position, then the window is full.
        assert out.tokens_generated <= 2 and out.finish_reason == "length"


# ---------------------------------------------------------------------------
# multi-turn KV prefix reuse
# ---------------------------------------------------------------------------


def test_tiny_llama_is_batch_invariant(tiny: LlamaCppBackend) -> None:
    """The premise of the exact comparisons below: on the tiny model, how a
    prompt is split into decode calls does not change the logits."""
    from xybrid._native import _engine

    toks = chat_tokens(tiny, [ChatMessage.user("What is the capital of France? Paris.")])
    ctx = _engine.Context(tiny.model, n_ctx=256, n_threads=1)
    try:
        ctx.decode(toks, 0)
        whole = ctx.logits()
        for cut in (1, 5, len(toks) - 4):
            ctx.memory_clear()
            ctx.decode(toks[:cut], 0)
            for i in range(cut, cut + 3):  # a few one-token decodes, like generated tokens
                ctx.decode([toks[i]], i)
            ctx.decode(toks[cut + 3:], cut + 3)
            assert ctx.logits() == whole
    finally:
        ctx.close()


def test_multi_turn_reuses_prefix_and_matches_full_prefill(
        tiny: LlamaCppBackend, tiny_ref: LlamaCppBackend) -> None:
    """Three turns replaying the model's own replies: every later turn reuses
    the cached prefix and produces exactly what a cleared cache produces."""
    assert tiny.last_cached_prefix_len() is None  # before any call
    cfg = GREEDY(max_tokens=12)
    history = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
    first = tiny.generate(history, cfg)
    assert first.cached_prompt_tokens == 0
    assert tiny.last_cached_prefix_len() == 0
    assert_same_reply(first, fresh_output(tiny_ref, history, cfg))
    previous_prompt = chat_tokens(tiny, history)
    for user in ("Tell me more.", "And once more, please."):
        history = history + [ChatMessage.assistant(first.text), ChatMessage.user(user)]
        prompt = chat_tokens(tiny, history)
        out = tiny.generate(history, cfg)
        assert_reused(out, previous_prompt, first, prompt)
        assert tiny.last_cached_prefix_len() == out.cached_prompt_tokens
        assert_same_reply(out, fresh_output(tiny_ref, history, cfg))
        first, previous_prompt = out, prompt


def test_identical_prompt_reuses_all_but_the_last_token(
        tiny: LlamaCppBackend, tiny_ref: LlamaCppBackend) -> None:
    msgs = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Same question twice.")]
    cfg = GREEDY(max_tokens=6)
    a = tiny.generate(msgs, cfg)
    b = tiny.generate(msgs, cfg)
    # Capped one short of the prompt (its last token is decoded again for the
    # logits), then aligned.
    assert b.cached_prompt_tokens == aligned(b.prompt_tokens - 1) > 0
    assert_same_reply(a, b)
    assert_same_reply(b, fresh_output(tiny_ref, msgs, cfg))


def test_gemma_second_turn_reuses_the_cache(gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    assert b.last_cached_prefix_len() is None  # reset_cache() forgets everything
    cfg = GREEDY(max_tokens=8)
    turn1 = [ChatMessage.system(GEO_SYSTEM), ChatMessage.user("What is the capital of France?")]
    first = b.generate(turn1, cfg)
    assert first.cached_prompt_tokens == 0 and b.last_cached_prefix_len() == 0
    assert first.prompt_tokens == len(chat_tokens(b, turn1))
    # The assistant turn is a fixed reply (not the model's), so the reused
    # prefix lies in the first prompt; see the module docstring.
    turn2 = turn1 + [ChatMessage.assistant("Paris."),
                     ChatMessage.user("And what is the capital of Germany?")]
    second = b.generate(turn2, cfg)
    assert_reused(second, chat_tokens(b, turn1), first, chat_tokens(b, turn2))
    assert second.cached_prompt_tokens == b.last_cached_prefix_len() > 0
    assert "Berlin" in second.text
    b.reset_cache()
    assert b.last_cached_prefix_len() is None
    cleared = b.generate(turn2, cfg)
    assert cleared.cached_prompt_tokens == 0
    assert_same_reply(second, cleared)


def test_cache_holds_only_decoded_tokens(gemma_backend: LlamaCppBackend) -> None:
    """The last sampled token of a reply is never decoded into the KV cache,
    so a next prompt that continues the reply must not count it as cached.
    Built so that the aligned reusable prefix would end exactly after that
    token if the backend believed it was in the cache (llama.cpp would then
    decode the tail with a hole at position 2*ALIGN - 1)."""
    b = gemma_backend
    target = 2 * ALIGN  # prompt + reply tokens
    for prefix in ("Let us count: ", "We count: ", "Counting: ", "Count up now: "):
        p1 = prefix + ", ".join(str(i) for i in range(1, 12)) + ","
        t1 = b.model.tokenize(p1, add_special=True, parse_special=True)
        if ALIGN <= len(t1) and (target - len(t1)) % 4 == 0:  # whole " NN," groups
            break
    else:
        pytest.fail("no prompt of the wanted length")
    first = b.generate_raw(p1, GREEDY(max_tokens=target - len(t1)))
    assert first.finish_reason == "length" and first.text.endswith(",")
    p2 = p1 + first.text + " 99, 100, 101,"
    t2 = b.model.tokenize(p2, add_special=True, parse_special=True)
    assert t2[:target] == t1 + list(first.token_ids)  # the premise
    second = b.generate_raw(p2, GREEDY(max_tokens=6))
    # Cached: the prompt and the decoded reply tokens, one short of target.
    assert second.cached_prompt_tokens == aligned(target - 1)
    b.reset_cache()
    assert_same_reply(second, b.generate_raw(p2, GREEDY(max_tokens=6)))


def test_longest_prefix_reuse_keeps_the_reply_in_the_cache(tiny_llama_path: Path) -> None:
    """prefix_reuse="longest": the decoded reply tokens stay reusable and
    nothing is cut to an alignment, so a prompt that continues the previous
    prompt and reply re-decodes only what is new."""
    with LlamaCppBackend(tiny_config(tiny_llama_path).replace(prefix_reuse="longest")) as b:
        prompt = b.model.tokenize("Once upon a time, in a land far away,", add_special=True)
        first = b.generate_raw(prompt, GREEDY(max_tokens=9))
        assert first.finish_reason == "length" and first.cached_prompt_tokens == 0
        reply = list(first.token_ids)
        # Everything but the last sampled token (never decoded) is reused.
        follow = prompt + reply + b.model.tokenize(" and then", add_special=False)
        second = b.generate_raw(follow, GREEDY(max_tokens=4))
        assert second.cached_prompt_tokens == len(prompt) + len(reply) - 1
        assert b.last_cached_prefix_len() == second.cached_prompt_tokens
        # An identical prompt re-decodes only its last token: no alignment.
        third = b.generate_raw(follow, GREEDY(max_tokens=4))
        assert third.cached_prompt_tokens == len(follow) - 1
        # A chat turn replaying the model's reply reuses more than the
        # previous prompt alone.
        history = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
        b.reset_cache()
        turn1 = b.generate(history, GREEDY(max_tokens=12))
        history += [ChatMessage.assistant(turn1.text), ChatMessage.user("Tell me more.")]
        turn2 = b.generate(history, GREEDY(max_tokens=12))
        assert turn2.cached_prompt_tokens is not None
        assert turn2.cached_prompt_tokens >= turn1.prompt_tokens
    with pytest.raises(InvalidInputError, match="prefix_reuse"):
        tiny_config(tiny_llama_path).replace(prefix_reuse="fast")


@pytest.mark.parametrize("kind", ["recurrent", "hybrid"])
def test_recurrent_and_hybrid_models_take_the_full_clear_path(
        kind: str, tiny_recurrent_path: Path, tiny_hybrid_path: Path) -> None:
    path = tiny_recurrent_path if kind == "recurrent" else tiny_hybrid_path
    cfg = GREEDY(max_tokens=10)
    history = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
    with LlamaCppBackend(tiny_config(path)) as b, LlamaCppBackend(tiny_config(path)) as ref:
        assert b.model.has_recurrent_state
        assert (b.model.is_recurrent, b.model.is_hybrid) == (
            (True, False) if kind == "recurrent" else (False, True))
        first = b.generate(history, cfg)
        assert first.cached_prompt_tokens == 0
        assert_same_reply(first, ref.generate(history, cfg))
        for user in ("Tell me more.", "Again."):
            history = history + [ChatMessage.assistant(first.text), ChatMessage.user(user)]
            out = b.generate(history, cfg)
            # The prompts share a long prefix, but recurrent state cannot be
            # cut back to a position: nothing is reused ...
            assert out.cached_prompt_tokens == 0
            assert b.last_cached_prefix_len() == 0
            # ... and the reply is the one a brand-new backend gives.
            with LlamaCppBackend(tiny_config(path)) as fresh:
                assert_same_reply(out, fresh.generate(history, cfg))
            first = out
        # The streaming path takes the same route.
        pieces = list(b.stream(history, cfg))
        assert pieces[-1].finish_reason == first.finish_reason
        assert pieces[-1].cumulative_text == first.text
        assert b.last_cached_prefix_len() == 0


# ---------------------------------------------------------------------------
# context overflow
# ---------------------------------------------------------------------------


def test_overflowing_turn_takes_the_full_clear_path(
        tiny_llama_path: Path) -> None:
    config = tiny_config(tiny_llama_path, context_length=256)
    turn1 = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
    turn2 = turn1 + [ChatMessage.assistant("Hi."), ChatMessage.user("Tell me a long story.")]
    with LlamaCppBackend(config) as b, LlamaCppBackend(config) as ref:
        n_ctx = b.context_length()
        assert n_ctx == 256
        b.generate(turn1, GREEDY(max_tokens=4))
        n2 = len(chat_tokens(b, turn2))
        # Control: with room to spare the second turn reuses the first prompt.
        small = GREEDY(max_tokens=4)
        assert b.generate(turn2, small).cached_prompt_tokens > 0
        b.reset_cache()
        b.generate(turn1, GREEDY(max_tokens=4))
        # prefix + tail + max_tokens == n_ctx: the cache is dropped.
        big = GREEDY(max_tokens=n_ctx - n2)
        out = b.generate(turn2, big)
        assert out.cached_prompt_tokens == 0
        assert b.last_cached_prefix_len() == 0
        assert out.prompt_tokens == n2
        # It still generates correctly, up to the end of the window.
        assert_same_reply(out, ref.generate(turn2, big))
        assert out.tokens_generated <= n_ctx - n2


def test_prompt_longer_than_the_context_raises(tiny: LlamaCppBackend,
                                               tiny_ref: LlamaCppBackend) -> None:
    cfg = GREEDY(max_tokens=6)
    ok = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
    before = tiny.generate(ok, cfg)
    n_ctx = tiny.context_length()
    assert n_ctx is not None
    too_long = [ChatMessage.user(" a" * n_ctx)]
    assert len(chat_tokens(tiny, too_long)) >= n_ctx
    with pytest.raises(ContextOverflowError, match=str(n_ctx)):
        tiny.generate(too_long, cfg)
    with pytest.raises(ContextOverflowError):
        tiny.generate_streaming(too_long, cfg, lambda piece: None)
    with pytest.raises(ContextOverflowError):
        list(tiny.stream(too_long, cfg))
    with pytest.raises(ContextOverflowError):
        tiny.generate_raw(" a" * n_ctx, cfg)
    assert issubclass(ContextOverflowError, InvalidInputError)
    # The backend is unharmed: the previous conversation is still cached and
    # the reply is unchanged.
    again = tiny.generate(ok, cfg)
    assert again.cached_prompt_tokens == aligned(again.prompt_tokens - 1) > 0
    assert_same_reply(before, again)
    follow = ok + [ChatMessage.assistant(before.text), ChatMessage.user("More.")]
    assert_same_reply(tiny.generate(follow, cfg), fresh_output(tiny_ref, follow, cfg))


# ---------------------------------------------------------------------------
# failed and cancelled generations reset the cache
# ---------------------------------------------------------------------------

TURN1 = [ChatMessage.system(LONG_SYSTEM), ChatMessage.user("Hello there")]
TURN2 = TURN1 + [ChatMessage.assistant("Hi."), ChatMessage.user("Tell me more.")]


def _primed(b: LlamaCppBackend) -> None:
    b.generate(TURN1, GREEDY(max_tokens=4))
    assert b.last_cached_prefix_len() == 0


def _check_recovered(b: LlamaCppBackend, ref: LlamaCppBackend) -> None:
    """After a reset nothing cached is trusted: the next call prefills all of
    its prompt and replies exactly like a fresh backend."""
    assert b.last_cached_prefix_len() is None
    cfg = GREEDY(max_tokens=12)
    out = b.generate(TURN2, cfg)
    assert out.cached_prompt_tokens == 0
    assert_same_reply(out, fresh_output(ref, TURN2, cfg))
    # And prefix reuse works again afterwards.
    turn3 = TURN2 + [ChatMessage.assistant(out.text), ChatMessage.user("Thanks.")]
    out3 = b.generate(turn3, cfg)
    assert out3.cached_prompt_tokens > 0
    assert_same_reply(out3, fresh_output(ref, turn3, cfg))


def test_callback_exception_propagates_and_resets(tiny: LlamaCppBackend,
                                                  tiny_ref: LlamaCppBackend) -> None:
    _primed(tiny)
    boom = Boom("stop right there")
    seen = []

    def on_token(piece):  # type: ignore[no-untyped-def]
        seen.append(piece)
        raise boom

    with pytest.raises(Boom) as info:
        tiny.generate_streaming(TURN2, GREEDY(max_tokens=32), on_token)
    assert info.value is boom
    assert len(seen) == 1 and seen[0].finish_reason is None
    _check_recovered(tiny, tiny_ref)


def test_exception_thrown_into_stream_propagates_and_resets(
        tiny: LlamaCppBackend, tiny_ref: LlamaCppBackend) -> None:
    _primed(tiny)
    boom = Boom("consumer failed")
    it = tiny.stream(TURN2, GREEDY(max_tokens=32))
    first = next(it)
    assert first.finish_reason is None
    with pytest.raises(Boom) as info:
        it.throw(boom)
    assert info.value is boom
    _check_recovered(tiny, tiny_ref)


def test_consumer_raising_inside_a_for_loop_releases_the_backend(
        tiny: LlamaCppBackend, tiny_ref: LlamaCppBackend) -> None:
    _primed(tiny)

    def consume() -> None:
        for _piece in tiny.stream(TURN2, GREEDY(max_tokens=32)):
            raise Boom("in the loop body")

    with pytest.raises(Boom):
        consume()
    _check_recovered(tiny, tiny_ref)


def test_callback_returning_false_cancels(tiny_long: LlamaCppBackend,
                                          tiny_ref: LlamaCppBackend) -> None:
    b = tiny_long
    _primed(b)
    seen = []

    def on_token(piece):  # type: ignore[no-untyped-def]
        seen.append(piece)
        return False

    out = b.generate_streaming(TURN2, GREEDY(max_tokens=LONG), on_token)
    assert out.finish_reason == "cancelled"
    assert out.stop_reason == "cancelled"
    assert 0 < out.tokens_generated < LONG
    assert seen[0].finish_reason is None
    # The terminal piece still arrives, carrying the reason.
    assert seen[-1].finish_reason == "cancelled" and seen[-1].text == ""
    assert sum(p.finish_reason is not None for p in seen) == 1
    _check_recovered(b, tiny_ref)


@pytest.mark.parametrize("how", ["close", "break"])
def test_closing_the_stream_early_cancels_and_resets(
        how: str, tiny: LlamaCppBackend, tiny_ref: LlamaCppBackend) -> None:
    _primed(tiny)
    cfg = GREEDY(max_tokens=64)
    full = fresh_output(tiny_ref, TURN2, cfg)
    assert full.tokens_generated > 2
    if how == "close":
        it = tiny.stream(TURN2, cfg)
        got = next(it)
        it.close()
    else:
        for got in tiny.stream(TURN2, cfg):  # noqa: B007 - CPython closes it on break
            break
    assert got.finish_reason is None
    assert full.text.startswith(got.text.strip()) or full.text.startswith(got.text)
    _check_recovered(tiny, tiny_ref)


# ---------------------------------------------------------------------------
# finish_reason, stop sequences and reply clean-up (Gemma)
# ---------------------------------------------------------------------------

POEM = [ChatMessage.user("Write a short poem about the sea.")]
COUNT = [ChatMessage.user("Count: 1, 2, 3, 4, 5,")]


def test_length_when_max_tokens_is_reached(gemma_backend: LlamaCppBackend) -> None:
    out = gemma_backend.generate(POEM, GREEDY(max_tokens=6))
    assert out.finish_reason == "length"
    assert out.stop_reason == "length"
    assert out.tokens_generated == 6 == len(out.token_ids)


def test_user_stop_sequence(gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    ref = b.generate(COUNT, GREEDY(max_tokens=16))
    assert ref.finish_reason == "length"
    # A stop string taken from the middle of the greedy reply.
    stop = "3\n"
    assert stop in ref.text
    expected = ref.text[: ref.text.index(stop)].strip()
    assert expected
    b.reset_cache()
    pieces = []
    out = b.generate_streaming(COUNT, GREEDY(max_tokens=16, stop_sequences=[stop]),
                               pieces.append)
    assert out.finish_reason == "stop"
    assert out.stop_reason == "stop"
    assert out.text == expected
    assert stop not in out.text
    assert all(stop not in p.text and stop not in p.cumulative_text for p in pieces)
    assert out.tokens_generated < ref.tokens_generated
    assert pieces[-1].finish_reason == "stop"
    # The same through stream() and generate().
    b.reset_cache()
    assert b.generate(COUNT, GREEDY(max_tokens=16, stop_sequences=[stop])).text == expected
    b.reset_cache()
    streamed = list(b.stream(COUNT, GREEDY(max_tokens=16, stop_sequences=(stop,))))
    assert streamed[-1].finish_reason == "stop"
    assert streamed[-1].cumulative_text == expected


def test_chat_markers_stop_a_chat_reply_but_not_a_raw_continuation(
        gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    text = "[INST] hello [INST] hello [INST] hello [INST]"
    assert "[INST]" in CHAT_STOP_PATTERNS
    raw = b.generate_raw(text, GREEDY(max_tokens=12))
    assert "[INST]" in raw.text  # a raw continuation keeps it ...
    assert raw.finish_reason == "length"
    b.reset_cache()
    out = b.generate([ChatMessage.user(text)], GREEDY(max_tokens=12))
    assert "[INST]" not in out.text  # ... a chat reply ends before it
    assert out.finish_reason == "stop"
    assert out.tokens_generated < 12


def test_reasoning_is_stripped_from_chat_replies(gemma_backend: LlamaCppBackend) -> None:
    """The base model echoes the user's message, tags included; the chat path
    hides the reasoning block in the stream and in the final text."""
    b = gemma_backend
    user = "<think>The user wants a greeting.</think>Hello there, friend!"
    cfg = GREEDY(max_tokens=16)
    raw = b.generate_raw(b.format_chat([ChatMessage.user(user)]), cfg)
    assert raw.text.startswith("<think>The user wants a greeting.</think>Hello")
    b.reset_cache()
    pieces = []
    out = b.generate_streaming([ChatMessage.user(user)], cfg, pieces.append)
    assert out.text.startswith("Hello there, friend!")
    for text in [out.text] + [p.text for p in pieces] + [p.cumulative_text for p in pieces]:
        assert "think" not in text and "greeting" not in text
    assert out.tokens_generated == raw.tokens_generated
    assert out.token_ids == raw.token_ids  # same tokens, only the text is cleaned


# ---------------------------------------------------------------------------
# generate_raw
# ---------------------------------------------------------------------------


def test_generate_raw_is_the_engine_continuation(gemma_backend: LlamaCppBackend) -> None:
    from xybrid._native import _engine

    b = gemma_backend
    prompt = "1, 2, 3, 4, 5,"
    tokens = b.model.tokenize(prompt, add_special=True, parse_special=True)
    assert tokens[0] == b.model.bos_token  # BOS added
    assert tokens[1:] == b.model.tokenize(prompt, add_special=False, parse_special=True)
    ctx = _engine.Context(b.model, n_ctx=256, n_threads=1)
    try:
        engine = ctx.generate(tokens, _engine.Sampler(b.model, temperature=0.0), max_tokens=12)
    finally:
        ctx.close()
    out = b.generate_raw(prompt, GREEDY(max_tokens=12))
    assert out.text == engine.text  # verbatim, leading space included
    assert out.text.startswith(" ")
    assert list(out.token_ids) == engine.tokens
    assert out.prompt_tokens == len(tokens)
    assert out.cached_prompt_tokens == 0
    assert out.finish_reason == "length"
    # Only the caller's stop sequences stop it; the text is cut before them.
    stop = engine.text.split(",")[2] + ","  # e.g. " 8,"
    b.reset_cache()
    cut = b.generate_raw(prompt, GREEDY(max_tokens=12, stop_sequences=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == engine.text[: engine.text.index(stop)]
    with pytest.raises(InvalidInputError):
        b.generate_raw(["not", "a", "str"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# telemetry
# ---------------------------------------------------------------------------

TO_DICT_KEYS = {
    "text", "finish_reason", "stop_reason", "tokens_in", "prompt_cached_tokens", "tokens_out",
    "tokens_generated", "generation_time_ms", "tokens_per_second", "ttft_ms", "mean_itl_ms",
    "p95_itl_ms", "emitted_chunks", "inter_chunk_ms", "decode_tps", "prefill_tps", "token_ids",
}


def test_telemetry_fields(gemma_backend: LlamaCppBackend) -> None:
    b = gemma_backend
    turn1 = [ChatMessage.system(GEO_SYSTEM), ChatMessage.user("Write a short poem.")]
    out = b.generate(turn1, GREEDY(max_tokens=8))
    assert out.tokens_generated == len(out.token_ids) == 8
    assert out.prompt_tokens == len(chat_tokens(b, turn1))
    assert out.cached_prompt_tokens == 0
    assert out.ttft_ms is not None and out.ttft_ms > 0
    assert out.decode_tps is not None and out.decode_tps > 0
    assert out.prefill_tps is not None and out.prefill_tps > 0
    assert out.mean_itl_ms is not None and out.mean_itl_ms > 0
    # Nearest-rank p95 of fewer than 20 gaps is the largest gap.
    assert out.p95_itl_ms is not None and out.p95_itl_ms >= out.mean_itl_ms
    assert out.generation_time_ms >= out.ttft_ms
    assert out.tokens_per_second > 0
    assert out.tokens_per_second == pytest.approx(
        out.tokens_generated / (out.generation_time_ms / 1000), rel=1e-6)
    # decode_tps counts the n-1 tokens after the first over their span.
    assert out.decode_tps == pytest.approx((out.tokens_generated - 1) / (
        (out.generation_time_ms - out.ttft_ms) / 1000), rel=0.5)
    d = out.to_dict()
    assert TO_DICT_KEYS <= set(d)
    assert d["tokens_in"] == out.prompt_tokens
    assert d["tokens_out"] == d["tokens_generated"] == 8
    assert d["prompt_cached_tokens"] == 0
    assert d["token_ids"] == list(out.token_ids)

    # llama.cpp's own counters for the same run (read from the backend's
    # context): they agree with ours.
    perf = b._loaded.context.perf()  # white-box: the run that just ended
    assert perf["n_prompt_eval"] == out.prompt_tokens
    assert perf["n_eval"] == out.tokens_generated - 1  # the last token is not decoded
    assert perf["t_eval_ms"] > 0
    llama_tps = perf["n_eval"] / (perf["t_eval_ms"] / 1000)
    assert 0.5 < out.decode_tps / llama_tps < 2.0

    # A second turn reports what it reused.
    follow = turn1 + [ChatMessage.assistant("Waves."), ChatMessage.user("Another one.")]
    out2 = b.generate(follow, GREEDY(max_tokens=4))
    assert out2.cached_prompt_tokens > 0
    assert out2.to_dict()["prompt_cached_tokens"] == out2.cached_prompt_tokens
    assert b._loaded.context.perf()["n_prompt_eval"] == out2.prompt_tokens - out2.cached_prompt_tokens


def test_streaming_telemetry_counts_chunks(gemma_backend: LlamaCppBackend) -> None:
    pieces = []
    out = gemma_backend.generate_streaming(POEM, GREEDY(max_tokens=8), pieces.append)
    assert out.emitted_chunks >= 1
    assert len([p for p in pieces if p.finish_reason is None]) >= 1
    assert out.tokens_generated == 8
    if out.emitted_chunks > 1:
        assert out.inter_chunk_ms is not None and out.inter_chunk_ms >= 0


# ---------------------------------------------------------------------------
# loading, lifecycle and input validation
# ---------------------------------------------------------------------------


def test_load_errors_leave_the_backend_usable(tmp_path: Path, tiny_llama_path: Path) -> None:
    cfg = GREEDY(max_tokens=6)
    msgs = [ChatMessage.user("Hello there")]
    b = LlamaCppBackend()
    assert not b.is_loaded
    assert b.last_cached_prefix_len() is None
    assert b.context_length() is None and b.memory_usage() is None
    with pytest.raises(ModelNotLoadedError):
        b.generate(msgs, cfg)
    with pytest.raises(ModelNotLoadedError):
        b.generate_raw("hi", cfg)
    with pytest.raises(ModelNotLoadedError):
        b.generate_streaming(msgs, cfg, lambda p: None)
    with pytest.raises(ModelNotLoadedError):
        list(b.stream(msgs, cfg))
    with pytest.raises(ModelNotLoadedError):
        b.reset_cache()

    def failures() -> None:
        with pytest.raises(ModelNotFoundError):
            b.load(tiny_config(tmp_path / "missing.gguf"))
        empty = tmp_path / "empty"
        empty.mkdir(exist_ok=True)
        (empty / "readme.txt").write_text("no model here")
        with pytest.raises(ModelNotFoundError, match="no .gguf"):
            b.load(tiny_config(empty))
        not_gguf = tmp_path / "fake.gguf"
        not_gguf.write_bytes(b"this is not a GGUF file at all" * 10)
        with pytest.raises(ModelLoadError):
            b.load(tiny_config(not_gguf))
        truncated = tmp_path / "truncated.gguf"
        truncated.write_bytes(tiny_llama_path.read_bytes()[:4096])
        with pytest.raises(ModelLoadError):
            b.load(tiny_config(truncated))
        with pytest.raises(InvalidInputError):
            b.load(str(tiny_llama_path))  # type: ignore[arg-type]

    failures()
    assert not b.is_loaded
    # A directory holding a .gguf loads it.
    folder = tmp_path / "model-dir"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    os.symlink(tiny_llama_path, folder / "tiny.gguf")
    b.load(tiny_config(folder))
    assert b.is_loaded and b.model_path == folder / "tiny.gguf"
    reference = b.generate(msgs, cfg)
    # Failed loads do not disturb the loaded model.
    failures()
    assert b.is_loaded and b.model_path == folder / "tiny.gguf"
    b.reset_cache()
    assert_same_reply(b.generate(msgs, cfg), reference)
    b.unload()
    b.unload()  # safe twice
    assert not b.is_loaded


BAD_MESSAGES = [
    [],
    (),
    "Hello",
    b"Hello",
    None,
    [123],
    ["Hello"],
    [{"role": "robot", "content": "hi"}],
    [{"content": "no role"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    [ChatMessage.user("ok"), 7],
]


@pytest.mark.parametrize("messages", BAD_MESSAGES, ids=repr)
def test_bad_messages_raise_invalid_input(tiny: LlamaCppBackend, messages: object) -> None:
    cfg = GREEDY(max_tokens=4)
    good = [ChatMessage.user("Hello there")]
    reference = tiny.generate(good, cfg)
    with pytest.raises(InvalidInputError):
        tiny.generate(messages, cfg)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        tiny.generate_streaming(messages, cfg, lambda p: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        list(tiny.stream(messages, cfg))  # type: ignore[arg-type]
    assert_same_reply(tiny.generate(good, cfg), reference)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", True),
    ("max_tokens", 2.5),
    ("temperature", -1.0),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", 2.0),
    ("top_k", -1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty_window", -2),
    ("seed", -1),
    ("seed", 2**32),
    ("stop_sequences", [""]),
    ("stop_sequences", [3]),
    ("grammar", ""),
])
def test_bad_generation_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=field):
        GenerationConfig(**{field: value})


def test_bad_config_objects_and_callbacks(tiny: LlamaCppBackend) -> None:
    msgs = [ChatMessage.user("Hello there")]
    cfg = GREEDY(max_tokens=4)
    reference = tiny.generate(msgs, cfg)
    for bad in ({"max_tokens": 4}, 4, "greedy"):
        with pytest.raises(InvalidInputError, match="GenerationConfig"):
            tiny.generate(msgs, bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError):
            tiny.generate_raw("hi", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="callable"):
        tiny.generate_streaming(msgs, cfg, "not callable")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="context_length"):
        LlmConfig("x.gguf", context_length=0)
    with pytest.raises(InvalidInputError, match="model_path"):
        LlmConfig("")
    # Dicts are accepted as messages, with None config meaning defaults.
    out = tiny.generate([{"role": "user", "content": "Hello there"}], cfg)
    assert_same_reply(out, reference)
    default = tiny.generate(msgs, GenerationConfig(max_tokens=4, seed=1))
    assert default.tokens_generated <= 4
    assert isinstance(tiny.generate(msgs, None), GenerationOutput)


def test_context_manager_unloads(tiny_llama_path: Path) -> None:
    msgs = [ChatMessage.user("Hello there")]
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as b:
        assert b.is_loaded
        first = b.generate(msgs, GREEDY(max_tokens=4))
        assert b.last_cached_prefix_len() == 0
    assert not b.is_loaded
    assert b.model_path is None and b.chat_template_name is None
    assert b.context_length() is None and b.memory_usage() is None
    assert b.last_cached_prefix_len() is None
    with pytest.raises(ModelNotLoadedError):
        b.generate(msgs, GREEDY(max_tokens=4))
    with pytest.raises(ModelNotLoadedError):
        _ = b.model
    # Loadable again, with a fresh cache.
    b.load(tiny_config(tiny_llama_path))
    again = b.generate(msgs, GREEDY(max_tokens=4))
    assert again.cached_prompt_tokens == 0
    assert_same_reply(first, again)
    b.unload()
    # An exception inside the block still unloads.
    with pytest.raises(Boom):
        with LlamaCppBackend(tiny_config(tiny_llama_path)) as b2:
            raise Boom()
    assert not b2.is_loaded


def test_reloading_replaces_the_model_and_the_cache(tiny_llama_path: Path,
                                                    tiny_recurrent_path: Path) -> None:
    msgs = [ChatMessage.user("Hello there")]
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as b:
        b.generate(msgs, GREEDY(max_tokens=4))
        assert b.last_cached_prefix_len() == 0
        b.load(tiny_config(tiny_recurrent_path))
        assert b.model_path == tiny_recurrent_path
        assert b.last_cached_prefix_len() is None
        with LlamaCppBackend(tiny_config(tiny_recurrent_path)) as ref:
            assert_same_reply(b.generate(msgs, GREEDY(max_tokens=6)),
                              ref.generate(msgs, GREEDY(max_tokens=6)))


def test_errors_are_xybrid_errors() -> None:
    for exc in (ModelNotFoundError, ModelLoadError, ModelNotLoadedError, InvalidInputError,
                ContextOverflowError):
        assert issubclass(exc, XybridError)
