"""Constrained decoding has bounded work, and admits only UTF-8.

- Work: a grammar that starts with more than ``MAX_GRAMMAR_STACKS`` parse
  stacks is refused when the sampler is built; one whose stacks multiply
  ends its request with a ``GrammarError`` naming the bound within moments, in the single-sequence loop and in the batching scheduler
  (the other sequences of the batch are unaffected), and the backend then
  answers as a fresh one does.
- A repetition of something that can match nothing (``(a? b?)*``, where
  llama.cpp's candidate matching explores every way of splitting a piece
  between empty and non-empty copies, exponential in its length) is refused
  by the validator, before llama.cpp sees it.
- UTF-8: every token a grammar admits, at every step, continues the reply as
  valid UTF-8 (llama.cpp's grammar alone lets lead bytes F5..FF, overlong
  forms, surrogates and code points past U+10FFFF through "." and negated
  classes). Checked on real vocabularies: Gemma 3, SmolLM2 and the vocab-only
  files of the llama.cpp source tree.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid._native._engine import Model, Sampler
from xybrid.errors import GrammarError
from xybrid.grammar import MAX_GRAMMAR_STACKS, json_schema_to_gbnf, validate_grammar

WIDE = "root ::= (" + " | ".join(f'"a{i}"' for i in range(MAX_GRAMMAR_STACKS + 1)) + ")"
# Optional rules inside a repetition: every character can be read in many
# ways, and llama.cpp's candidate matching explores each of them (16 tokens
# of an eight-optional version did not finish in 5 minutes).
AMBIGUOUS = ('root ::= (a? b? c? d?)*\na ::= [a-z ]?\nb ::= [a-z ]?\nc ::= [a-z ]?\n'
             'd ::= [a-z ]?')
# Each character doubles the parse stacks (two ways to close every opening).
DOUBLING = 's ::= [a-z ] s t | [a-z ] s u | ""\nt ::= [a-z ]\nu ::= [a-z ]\nroot ::= s'
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny_backend(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=256, n_threads=1)) as b:
        yield b


def _reference(backend: LlamaCppBackend) -> str:
    return backend.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=8)).text


def test_grammar_with_too_many_starting_stacks_is_refused_when_built(tiny_llama_path: Path) -> None:
    with Model(str(tiny_llama_path)) as model:
        with pytest.raises(GrammarError, match="MAX_GRAMMAR_STACKS"):
            Sampler(model, grammar=WIDE)
        # At the bound: built.
        at = "root ::= (" + " | ".join(f'"a{i}"' for i in range(MAX_GRAMMAR_STACKS)) + ")"
        assert Sampler(model, grammar=at).grammar_stats["stacks"] == MAX_GRAMMAR_STACKS


def test_grammar_whose_stacks_multiply_ends_with_a_grammar_error(tiny_backend: LlamaCppBackend) -> None:
    reference = _reference(tiny_backend)
    t0 = time.monotonic()
    with pytest.raises(GrammarError, match="MAX_GRAMMAR_STACKS"):
        tiny_backend.generate_raw(PROMPT, GenerationConfig(temperature=0.8, seed=1, max_tokens=64,
                                                           grammar=DOUBLING))
    assert time.monotonic() - t0 < 20
    assert _reference(tiny_backend) == reference


@pytest.mark.parametrize("grammar", [
    AMBIGUOUS,
    'root ::= ("a"? "b"? "c"? "d"? "e"? "f"? "g"? "h"?)*',
    'root ::= x+\nx ::= "a"? "b"?',
    'root ::= ("a"?){0,8} "b"',
    'root ::= ("a"*)* "b"',
    'root ::= (x | "b")*\nx ::= ""',
])
def test_a_repetition_of_what_can_match_nothing_is_refused(tiny_backend: LlamaCppBackend,
                                                           grammar: str) -> None:
    reference = _reference(tiny_backend)
    with pytest.raises(GrammarError, match="can match the empty string"):
        validate_grammar(grammar)
    with pytest.raises(GrammarError, match="can match the empty string"):
        tiny_backend.generate_raw(PROMPT, GenerationConfig(max_tokens=16, grammar=grammar))
    assert _reference(tiny_backend) == reference


def test_the_same_languages_written_without_it_run(tiny_backend: LlamaCppBackend) -> None:
    for grammar in ('root ::= (a | b | c | d)*\na ::= [a-z ]\nb ::= [a-z ]\nc ::= [a-z ]\n'
                    'd ::= [a-z ]',
                    'root ::= ("a"? "b"? "c"? "d"? "e"? "f"? "g"? "h"? ";")*',
                    'root ::= ("a"?){1} "b"'):
        validate_grammar(grammar)
        out = tiny_backend.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=16, grammar=grammar))
        assert out.tokens_generated > 0


def test_bounded_failure_in_a_batch_spares_the_other_sequences(tiny_llama_path: Path) -> None:
    config = LlmConfig(tiny_llama_path, context_length=512, n_batch=64, n_threads=1, parallel=3)
    plain = GenerationConfig.greedy(max_tokens=8)
    with LlamaCppBackend(config) as backend:
        alone = backend.generate_raw(PROMPT, plain).text
        bad = GenerationConfig(temperature=0.8, seed=1, max_tokens=64, grammar=DOUBLING)
        out = backend.generate_batch([PROMPT, PROMPT, PROMPT], [plain, bad, plain], raw=True,
                                     return_exceptions=True)
        assert isinstance(out[1], GrammarError) and "MAX_GRAMMAR" in str(out[1])
        assert out[0].text == alone and out[2].text == alone
        assert backend.generate_raw(PROMPT, plain).text == alone


def test_a_json_schema_grammar_stays_well_inside_the_stack_bound(tiny_llama_path: Path) -> None:
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}}},
        "required": ["name", "age"]}
    with Model(str(tiny_llama_path)) as model:
        sampler = Sampler(model, grammar=json_schema_to_gbnf(schema))
        stats = sampler.grammar_stats
        assert stats is not None and stats["stacks"] < MAX_GRAMMAR_STACKS // 16


# --- UTF-8 --------------------------------------------------------------------

# The UTF-8 automaton (RFC 3629): what may follow, by state.
_TAILS = {"start": None, "t1": (0x80, 0xBF, "start"), "t2": (0x80, 0xBF, "t1"),
          "t3": (0x80, 0xBF, "t2"), "e0": (0xA0, 0xBF, "t1"), "ed": (0x80, 0x9F, "t1"),
          "f0": (0x90, 0xBF, "t2"), "f4": (0x80, 0x8F, "t2")}


def _step(state: str, b: int) -> str | None:
    if state != "start":
        lo, hi, nxt = _TAILS[state]  # type: ignore[misc]
        return nxt if lo <= b <= hi else None
    if b < 0x80:
        return "start"
    if 0xC2 <= b <= 0xDF:
        return "t1"
    if b == 0xE0:
        return "e0"
    if b == 0xED:
        return "ed"
    if 0xE1 <= b <= 0xEF:
        return "t2"
    if b == 0xF0:
        return "f0"
    if 0xF1 <= b <= 0xF3:
        return "t3"
    if b == 0xF4:
        return "f4"
    return None


def _run(state: str, data: bytes) -> str | None:
    for b in data:
        next_state = _step(state, b)
        if next_state is None:
            return None
        state = next_state
    return state


# Byte-level BPE (gpt-2, qwen2, llama-bpe, command-r), SentencePiece with byte
# fallback (llama-spm, phi-3) and Gemma 4's vocabulary.
VOCAB_FILES = ["gpt-2", "qwen2", "llama-bpe", "command-r", "llama-spm", "phi-3", "gemma-4"]


def _walk(model: Model, grammar: str, steps: int, pieces: list[bytes] | None = None) -> int:
    """Walk the grammar for ``steps`` tokens, preferring tokens that leave a
    partial character (the hard case); assert every admitted token continues
    the bytes so far as UTF-8. Returns how many admitted tokens were checked."""
    if pieces is None:
        pieces = [model.token_to_piece(t, special=True) for t in range(model.n_vocab)]
    sampler = Sampler(model, grammar=grammar)
    state = "start"
    checked = 0
    for _ in range(steps):
        admitted = sampler.admitted()
        assert admitted, "the grammar admits nothing"
        chosen = None
        for tok in admitted:
            if model.is_eog(tok):
                continue
            after = _run(state, pieces[tok])
            assert after is not None, (
                f"token {tok} {pieces[tok]!r} is admitted but is not UTF-8 after state {state}")
            checked += 1
            if chosen is None or (after != "start" and chosen[1] == "start"):
                chosen = (tok, after)
        assert chosen is not None
        sampler.accept(chosen[0])
        state = chosen[1]
    return checked


GRAMMARS = ['root ::= .*', 'root ::= [^"]*', 'root ::= [^a-z]*',
            'root ::= [\\x80-\\U0010FFFF]*']


@pytest.mark.parametrize("name", VOCAB_FILES)
def test_admitted_tokens_are_utf8_on_the_vocab_files(llama_cpp_dir: Path, name: str) -> None:
    with Model(str(llama_cpp_dir / "models" / f"ggml-vocab-{name}.gguf"), vocab_only=True) as model:
        pieces = [model.token_to_piece(t, special=True) for t in range(model.n_vocab)]
        for grammar in GRAMMARS[:2]:
            assert _walk(model, grammar, 2, pieces) > 0


_PIECES: dict[int, list[bytes]] = {}


def _gemma_pieces(model: Model) -> list[bytes]:
    if id(model) not in _PIECES:
        _PIECES[id(model)] = [model.token_to_piece(t, special=True) for t in range(model.n_vocab)]
    return _PIECES[id(model)]


@pytest.mark.parametrize("grammar", GRAMMARS + ["json"])
def test_admitted_tokens_are_utf8_on_gemma(gemma_model: Model, grammar: str) -> None:
    if grammar == "json":
        grammar = json_schema_to_gbnf({"type": "object", "properties": {"s": {"type": "string"}}})
    assert _walk(gemma_model, grammar, 4, _gemma_pieces(gemma_model)) > 0


def test_admitted_tokens_are_utf8_on_smollm2() -> None:
    from xybrid.default_model import default_chat_model_path

    with Model(str(default_chat_model_path()), vocab_only=True) as model:
        pieces = [model.token_to_piece(t, special=True) for t in range(model.n_vocab)]
        for grammar in GRAMMARS:
            assert _walk(model, grammar, 3, pieces) > 0


def test_invalid_bytes_forced_by_logit_bias_are_not_emitted(gemma_backend: LlamaCppBackend,
                                                            gemma_model: Model) -> None:
    # Gemma's byte tokens <0xF8>..<0xFF> and a lone <0xC0>: not UTF-8
    # anywhere. Pushed to the top, llama.cpp's grammar alone admitted them.
    bad = [t for t in range(gemma_model.n_vocab)
           if gemma_model.token_to_piece(t, special=True) in
           {bytes([b]) for b in (0xC0, 0xC1, 0xF5, 0xF8, 0xFF)}]
    assert bad
    out = gemma_backend.generate_raw("Hello", GenerationConfig(
        temperature=0.0, max_tokens=12, grammar='root ::= [^"]*',
        logit_bias={t: 100.0 for t in bad}))
    assert "\ufffd" not in out.text


def test_accepting_an_end_token_the_grammar_does_not_allow_is_an_error(tiny_llama_path: Path) -> None:
    # llama.cpp's own grammar stage aborted the process here (GGML_ABORT).
    with Model(str(tiny_llama_path)) as model:
        sampler = Sampler(model, grammar='root ::= "ab"')
        with pytest.raises(GrammarError):
            sampler.accept(model.eos_token)
