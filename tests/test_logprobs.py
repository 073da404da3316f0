"""Logprobs collected by the engine in C: they must be the log-softmax of the
model's own logits at the same position, recomputed here on a fresh context
with the step primitives (Context.decode + Context.logits)."""

from __future__ import annotations

import pytest

from xybrid import GenerationConfig, LlmConfig
from xybrid._native import _engine
from xybrid.errors import InvalidInputError
from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.logprobs import log_softmax

PROMPT = "The three primary colours are"


def _replay(model, prompt_tokens, generated, n_top):  # type: ignore[no-untyped-def]
    """log p of each generated token and the top-n ids, from a fresh context
    that decodes the prompt then each generated token one at a time (as the
    loop does)."""
    ctx = _engine.Context(model, n_ctx=512, n_batch=256, n_threads=1)
    try:
        ctx.decode(prompt_tokens, 0)
        pos = len(prompt_tokens)
        chosen, tops = [], []
        for tok in generated:
            ref = log_softmax(ctx.logits())
            chosen.append(ref[tok])
            order = sorted(range(len(ref)), key=lambda i: (-ref[i], i))[:n_top]
            tops.append([(i, ref[i]) for i in order])
            ctx.decode([tok], pos)
            pos += 1
        return chosen, tops
    finally:
        ctx.close()


@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=0.9, top_k=20, seed=7, repeat_penalty=1.3)])
def test_engine_logprobs_match_log_softmax_of_fresh_logits(gemma_model, sampling) -> None:  # type: ignore[no-untyped-def]
    prompt = gemma_model.tokenize(PROMPT, add_special=True)
    ctx = _engine.Context(gemma_model, n_ctx=512, n_batch=256, n_threads=1)
    try:
        result = ctx.generate(prompt, _engine.Sampler(gemma_model, **sampling), max_tokens=6,
                              logprobs=3)
    finally:
        ctx.close()
    assert len(result.tokens) == 6
    assert len(result.logprobs) == len(result.top_logprobs) == 6
    chosen, tops = _replay(gemma_model, prompt, result.tokens, 3)
    for i in range(6):
        # Raw logits: sampler stages (penalties, temperature) do not change them.
        assert result.logprobs[i] == pytest.approx(chosen[i], abs=1e-4)
        assert [t for t, _ in result.top_logprobs[i]] == [t for t, _ in tops[i]]
        for (_, got), (_, want) in zip(result.top_logprobs[i], tops[i]):
            assert got == pytest.approx(want, abs=1e-4)
        assert result.top_logprobs[i][0][1] >= result.logprobs[i] - 1e-6
    if sampling["temperature"] == 0.0:
        # Greedy: the chosen token is the most likely one.
        assert all(top[0][0] == tok for top, tok in zip(result.top_logprobs, result.tokens))


def test_stream_logprobs_and_zero_alternatives(tiny_llama_path) -> None:  # type: ignore[no-untyped-def]
    model = _engine.Model(str(tiny_llama_path))
    ctx = _engine.Context(model, n_ctx=256, n_threads=1)
    prompt = model.tokenize("hello world", add_special=True)
    gen = ctx.stream(prompt, _engine.Sampler(model), max_tokens=8, logprobs=0)
    text = "".join(gen)
    assert gen.result.text == text
    assert len(gen.result.logprobs) == len(gen.result.tokens) == 8
    assert gen.result.top_logprobs == [[] for _ in range(8)]
    chosen, _ = _replay(model, prompt, gen.result.tokens, 1)
    assert gen.result.logprobs == pytest.approx(chosen, abs=1e-4)
    # Off by default: nothing collected.
    ctx.memory_clear()
    plain = ctx.generate(prompt, _engine.Sampler(model), max_tokens=2)
    assert plain.logprobs is None and plain.top_logprobs is None


def test_bad_logprobs_arguments_are_refused(tiny_llama_path) -> None:  # type: ignore[no-untyped-def]
    model = _engine.Model(str(tiny_llama_path))
    ctx = _engine.Context(model, n_ctx=256, n_threads=1)
    prompt = model.tokenize("hello", add_special=True)
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(InvalidInputError):
            ctx.generate(prompt, _engine.Sampler(model), max_tokens=2, logprobs=bad)
    with pytest.raises(InvalidInputError, match="exceeds the vocabulary"):
        ctx.generate(prompt, _engine.Sampler(model), max_tokens=2, logprobs=model.n_vocab + 1)
    # The context is still usable after the refusals.
    assert len(ctx.generate(prompt, _engine.Sampler(model), max_tokens=2, logprobs=1).logprobs) == 2
    with pytest.raises(InvalidInputError):
        GenerationConfig(logprobs=-2)


def test_backend_output_carries_logprobs(gemma_path) -> None:  # type: ignore[no-untyped-def]
    with LlamaCppBackend(LlmConfig(gemma_path, context_length=512, n_threads=1)) as llm:
        config = GenerationConfig.greedy(max_tokens=5, logprobs=2)
        out = llm.generate_raw(PROMPT, config)
        assert out.logprobs is not None and out.top_logprobs is not None
        assert len(out.logprobs) == len(out.token_ids) == len(out.top_logprobs) == out.tokens_generated
        assert all(len(row) == 2 for row in out.top_logprobs)
        assert [row[0][0] for row in out.top_logprobs] == list(out.token_ids)
        pieces = list(llm.stream_raw(PROMPT, config))
        final = pieces[-1].output
        assert final is not None and final.logprobs == pytest.approx(out.logprobs, abs=1e-5)
        assert llm.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=2)).logprobs is None


def test_top_alternatives_rank_the_whole_vocabulary(tiny_llama_path) -> None:  # type: ignore[no-untyped-def]
    """n = n_vocab: the alternatives are the full distribution, in order
    (larger log p first, ties by lower id)."""
    model = _engine.Model(str(tiny_llama_path))
    ctx = _engine.Context(model, n_ctx=256, n_threads=1)
    prompt = model.tokenize("hello world", add_special=True)
    r = ctx.generate(prompt, _engine.Sampler(model, temperature=0.8, seed=3), max_tokens=2,
                     logprobs=model.n_vocab)
    _, tops = _replay(model, prompt, r.tokens[:1], model.n_vocab)
    assert [t for t, _ in r.top_logprobs[0]] == [t for t, _ in tops[0]]
    assert [v for _, v in r.top_logprobs[0]] == pytest.approx([v for _, v in tops[0]], abs=1e-4)


@pytest.mark.parametrize("parallel", [1, 3])
def test_streamed_pieces_carry_logprobs_as_they_come(tiny_llama_path, parallel) -> None:  # type: ignore[no-untyped-def]
    """Each streamed piece carries the logprobs of the tokens sampled since
    the previous one; over the stream they are the output's, in order (the
    single-sequence loop and the scheduler, sync and async)."""
    import asyncio

    cfg = GenerationConfig(max_tokens=24, temperature=0.0, logprobs=2)
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=512, n_threads=1,
                                   parallel=parallel)) as llm:
        def check(pieces) -> None:  # type: ignore[no-untyped-def]
            out = pieces[-1].output
            assert out is not None and out.logprobs is not None and out.top_logprobs is not None
            got = [entry for p in pieces for entry in (p.logprobs or ())]
            assert [t for t, _, _ in got] == list(out.token_ids)
            assert [lp for _, lp, _ in got] == pytest.approx(list(out.logprobs), abs=1e-6)
            assert [tuple(top) for _, _, top in got] == [tuple(t) for t in out.top_logprobs]
            # They arrive with the text, not all at the end.
            assert sum(1 for p in pieces[:-1] if p.logprobs) >= 2

        llm.reset_cache()
        check(list(llm.stream_raw(PROMPT, cfg)))

        async def collect():  # type: ignore[no-untyped-def]
            return [p async for p in llm.astream_raw(PROMPT, cfg)]

        llm.reset_cache()
        check(asyncio.run(collect()))
        # Without logprobs asked for, pieces carry none.
        assert all(p.logprobs is None for p in llm.stream_raw(PROMPT, cfg.replace(logprobs=None)))
