"""Logit bias in the engine's sampler chain (llama.cpp's logit-bias stage).

On a tiny random-weight model with F32 weights (batch-invariant, so the
scheduler must give exactly the single-sequence loop's tokens): a -100 bias
bans the greedy token, a +100 bias forces a token, both in the
single-sequence loop and in the batching scheduler, greedy and sampled; bad
values are typed errors that leave the backend usable.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid._native import _engine
from xybrid.errors import InvalidInputError, XybridError
from xybrid.types import MAX_LOGIT_BIAS_ENTRIES

PROMPT = "Sample 3: the weather on day 3 was"
STEPS = 12


@pytest.fixture(scope="module")
def f32_path(tmp_path_factory: pytest.TempPathFactory, llama_cpp_dir: Path) -> Path:
    from xybrid.testing.tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-bias") / "tiny-f32.gguf",
                            dtype="f32", llama_cpp_dir=llama_cpp_dir)


def _config(path: Path, **kw: object) -> LlmConfig:
    base: dict[str, object] = dict(context_length=1024, n_threads=1, n_batch=128)
    base.update(kw)
    return LlmConfig(path, **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def solo(f32_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(_config(f32_path)) as b:
        yield b


@pytest.fixture(scope="module")
def batched(f32_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(_config(f32_path, parallel=4)) as b:
        assert b.parallel == 4
        yield b


def greedy(**kw: object) -> GenerationConfig:
    return GenerationConfig(max_tokens=STEPS, temperature=0.0, **kw)  # type: ignore[arg-type]


def run(backend: LlamaCppBackend, cfg: GenerationConfig) -> tuple[int, ...]:
    backend.reset_cache()
    return backend.generate_raw(PROMPT, cfg).token_ids


def ordinary_token(backend: LlamaCppBackend, avoid: set[int]) -> int:
    """A plain text token (not control, not end-of-generation) outside ``avoid``."""
    model = backend.model
    for tok in range(300, int(model.n_vocab)):
        if tok in avoid or model.is_eog(tok):
            continue
        piece = model.token_to_piece(tok, special=False).decode("utf-8", "replace")
        if piece.isascii() and piece.strip().isalpha():
            return tok
    raise AssertionError("no ordinary token found")


# --- the single-sequence loop -------------------------------------------------------------

def test_minus_100_bans_the_greedy_token(solo: LlamaCppBackend) -> None:
    base = run(solo, greedy())
    assert len(base) == STEPS
    first = base[0]
    banned = run(solo, greedy(logit_bias={first: -100}))
    assert banned != base
    assert banned[0] != first
    assert first not in banned  # banned at every step, not just the first
    # Deterministic: the same bias gives the same tokens again.
    assert run(solo, greedy(logit_bias={first: -100})) == banned


def test_plus_100_forces_a_token_greedy_and_sampled(solo: LlamaCppBackend) -> None:
    base = run(solo, greedy())
    forced = ordinary_token(solo, set(base))
    assert run(solo, greedy(logit_bias={forced: 100})) == (forced,) * STEPS
    sampled = GenerationConfig(max_tokens=STEPS, temperature=1.5, top_k=0, top_p=1.0,
                               min_p=0.0, seed=11, logit_bias={forced: 100.0})
    assert run(solo, sampled) == (forced,) * STEPS


def test_bias_reaches_the_native_sampler_and_keeps_logprobs_raw(
        solo: LlamaCppBackend) -> None:
    solo.reset_cache()
    base = solo.generate_raw(PROMPT, greedy(logprobs=2))
    forced = ordinary_token(solo, set(base.token_ids))
    solo.reset_cache()
    out = solo.generate_raw(PROMPT, greedy(logprobs=2, logit_bias={forced: 100}))
    assert out.token_ids[0] == forced
    # Logprobs are the model's own distribution: the forced token keeps its
    # (low) raw probability, below the unbiased top choice.
    assert out.logprobs is not None and base.logprobs is not None
    assert out.logprobs[0] < base.logprobs[0]
    assert out.top_logprobs is not None and base.top_logprobs is not None
    assert [t for t, _ in out.top_logprobs[0]] == [t for t, _ in base.top_logprobs[0]]
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(
        [lp for _, lp in base.top_logprobs[0]], abs=1e-4)
    sampler = _engine.Sampler(solo.model, temperature=0.0, logit_bias={forced: 100.0})
    assert sampler.params["logit_bias"] == {forced: 100.0}
    assert sampler.n_stages == 2  # the bias stage, then greedy
    assert not sampler.argmax_only


def test_bias_with_a_grammar_the_grammar_wins(solo: LlamaCppBackend) -> None:
    # Forcing a token the grammar forbids: the grammar's choice stands.
    out = run(solo, GenerationConfig(max_tokens=4, temperature=0.0, grammar='root ::= "ab"',
                                     logit_bias={ordinary_token(solo, set()): 100}))
    assert solo.model.detokenize(list(out)) == "ab"


# --- the batching scheduler ----------------------------------------------------------------

def test_scheduler_applies_each_sequences_own_bias(solo: LlamaCppBackend,
                                                  batched: LlamaCppBackend) -> None:
    base = run(solo, greedy())
    forced = ordinary_token(solo, set(base))
    cfgs = [greedy(), greedy(logit_bias={base[0]: -100}), greedy(logit_bias={forced: 100}),
            greedy(logit_bias={base[0]: -100, base[1]: -100})]
    want = [run(solo, c) for c in cfgs]
    assert want[0] == base and want[2] == (forced,) * STEPS
    assert base[0] not in want[1] and base[0] not in want[3] and base[1] not in want[3]
    got: list[tuple[int, ...] | None] = [None] * len(cfgs)
    barrier = threading.Barrier(len(cfgs))

    def one(i: int) -> None:
        barrier.wait()
        got[i] = batched.generate_raw(PROMPT, cfgs[i]).token_ids

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cfgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    outs = batched.generate_batch([PROMPT] * len(cfgs), cfgs, raw=True)
    assert [o.token_ids for o in outs] == want
    stats = batched.stats()
    assert stats["running"] == 0 and stats["queued"] == 0


def test_scheduler_streams_with_a_bias(batched: LlamaCppBackend) -> None:
    forced = ordinary_token(batched, set())
    pieces = list(batched.stream_raw(PROMPT, greedy(logit_bias={forced: 100})))
    final = pieces[-1].output
    assert final is not None and final.token_ids == (forced,) * STEPS
    assert "".join(p.text for p in pieces) == final.text


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {1: math.nan}, {1: math.inf}, {1: -math.inf}, {1: 100.5}, {1: -101}, {1: "5"},
    {1: True}, {"1": 5.0}, {True: 5.0}, {-1: 5.0}, {1.0: 5.0}, [(1, 5.0)], "x",
    {i: 1.0 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)},
])
def test_config_refuses_bad_logit_bias(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="logit_bias"):
        GenerationConfig(logit_bias=bad)  # type: ignore[arg-type]


def test_config_normalises_logit_bias() -> None:
    cfg = GenerationConfig(logit_bias={5: -100, 7: 2.5})
    assert cfg.logit_bias == {5: -100.0, 7: 2.5}
    assert all(type(v) is float for v in cfg.logit_bias.values())
    assert GenerationConfig(logit_bias={}).logit_bias is None
    assert GenerationConfig().logit_bias is None
    assert GenerationConfig(logit_bias={MAX_LOGIT_BIAS_ENTRIES - 1: 100.0}).replace(
        max_tokens=3).logit_bias == {MAX_LOGIT_BIAS_ENTRIES - 1: 100.0}


def test_out_of_vocabulary_ids_are_typed_errors_in_both_paths(
        solo: LlamaCppBackend, batched: LlamaCppBackend) -> None:
    n_vocab = int(solo.model.n_vocab)
    for backend in (solo, batched):
        with pytest.raises(InvalidInputError, match="not a token id of this model"):
            backend.generate_raw(PROMPT, greedy(logit_bias={n_vocab: 1.0}))
        # Still usable afterwards.
        assert len(run(backend, greedy())) == STEPS
    with pytest.raises(InvalidInputError, match="logit_bias"):
        _engine.Sampler(solo.model, logit_bias={0: math.nan})
    with pytest.raises(InvalidInputError, match="logit_bias"):
        _engine.Sampler(solo.model, logit_bias={n_vocab + 5: 1.0})
    with pytest.raises(XybridError, match="logit_bias"):
        _engine.Sampler(solo.model, logit_bias=[(0, 1.0)] * (MAX_LOGIT_BIAS_ENTRIES + 1))
    # Pairs are accepted by the engine as well as a mapping.
    assert _engine.Sampler(solo.model, logit_bias=[(3, -5.0)]).params["logit_bias"] == {3: -5.0}
