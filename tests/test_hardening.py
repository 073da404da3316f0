"""Hostile input found by fuzzing (issue 16), one regression test per case.

Every case here once killed the interpreter, hung it, leaked a built-in
exception or corrupted the next answer. Cases that aborted the process run in
a child process with the real extension, so a regression fails one test
instead of killing the session; after every failure in this process the next
valid call must return exactly what a fresh backend returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from xybrid import GenerationConfig, LlamaCppBackend, LlmConfig
from xybrid.errors import GrammarError, InvalidInputError, XybridError

PROMPT = "The quick brown fox"


def run_child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the real (installed) extension;
    the working directory is not the checkout, whose xybrid/ has no build."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(),
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def tiny_config(path: Path, **changes: Any) -> LlmConfig:
    return LlmConfig(path, context_length=256, n_batch=64, n_threads=1,
                     chat_template="chatml", **changes)


@pytest.fixture(scope="module")
def backend(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as b:
        yield b


@pytest.fixture(scope="module")
def reference(tiny_llama_path: Path) -> str:
    """What a fresh backend answers to PROMPT (greedy)."""
    with LlamaCppBackend(tiny_config(tiny_llama_path)) as fresh:
        return fresh.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=12)).text


def assert_fresh(backend: LlamaCppBackend, reference: str) -> None:
    """The invariant after any failure: the next valid call is untouched by it."""
    assert backend.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=12)).text == reference


# ---------------------------------------------------------------------------
# 1. C++ exceptions never cross into C: the engine's own grammar sampler,
#    with no Python pre-check in front of it.
# ---------------------------------------------------------------------------

# Grammars that pass every static check but allow no token at the first step
# on this vocabulary (token 2 is the end-of-generation token, refused while
# the grammar is unfinished). Before the shim, accepting the token the chain
# picked anyway threw std::runtime_error through C ("terminate called ...").
DEAD_GRAMMARS = [
    'root ::= <[2]> "a"',
    'root ::= <[2]>+ [a-z]',
]

_NATIVE_CHILD = """
    import sys
    from xybrid._native._engine import Context, Model, Sampler
    from xybrid.errors import GrammarError
    model = Model(sys.argv[1])
    ctx = Context(model, n_ctx=128, n_batch=32, n_threads=1)
    prompt = model.tokenize("The quick brown fox")
    ref = ctx.generate(prompt, Sampler(model, temperature=0.0), max_tokens=6).tokens
    for streaming in (False, True):
        ctx.memory_clear()
        try:
            ctx.generate(prompt, Sampler(model, temperature=0.0, grammar=sys.argv[2]),
                         max_tokens=6, on_text=(lambda s: None) if streaming else None)
        except GrammarError as exc:
            print("GrammarError:", exc)
        else:
            print("no error")
        ctx.memory_clear()
        assert ctx.generate(prompt, Sampler(model, temperature=0.0), max_tokens=6).tokens == ref
    print("usable")
"""


@pytest.mark.parametrize("grammar", DEAD_GRAMMARS)
def test_dead_grammar_in_the_engine_is_an_error_not_an_abort(tiny_llama_path: Path,
                                                            grammar: str) -> None:
    proc = run_child(_NATIVE_CHILD, str(tiny_llama_path), grammar)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("GrammarError: the grammar allows no token") == 2, proc.stdout
    assert "usable" in proc.stdout


def test_sampler_accept_of_a_refused_token_raises(tiny_llama_path: Path) -> None:
    # Sampler.accept hands a token to the grammar directly: a token the
    # grammar cannot take used to throw through C.
    proc = run_child("""
        import sys
        from xybrid._native._engine import Model, Sampler
        from xybrid.errors import GrammarError
        model = Model(sys.argv[1])
        s = Sampler(model, temperature=0.0, grammar='root ::= "x"')
        bad = model.tokenize("hello", add_special=False)[0]
        try:
            s.accept(bad)
        except GrammarError as exc:
            print("GrammarError:", exc)
    """, str(tiny_llama_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GrammarError: the grammar does not allow token" in proc.stdout


def test_sampler_refuses_an_unusable_grammar_before_llama_cpp(tiny_llama_path: Path) -> None:
    # The engine's Sampler runs validate_grammar itself (with the vocabulary
    # size), so every path to llama.cpp (backend, facade, CLI) is covered.
    from xybrid._native._engine import Model, Sampler

    model = Model(str(tiny_llama_path))
    with pytest.raises(GrammarError, match=r"token <\[999999\]>"):
        Sampler(model, grammar="root ::= <[999999]>")
    with pytest.raises(GrammarError, match="no 'start' rule"):
        Sampler(model, grammar='root ::= "a"', grammar_root="start")
    assert Sampler(model, grammar='start ::= "a"', grammar_root="start").n_stages >= 1
    model.close()


# ---------------------------------------------------------------------------
# validate_grammar proves a grammar can produce output
# ---------------------------------------------------------------------------

REFUSED_GRAMMARS = [
    # (grammar, what the message must name)
    ("root ::= [b-a]", "character range in rule 'root' is empty"),
    ('root ::= "x" | item\nitem ::= [z-a]', "range in rule 'item' is empty"),
    ('root ::= "\\U00110000"', "past the last one"),
    ("root ::= [a-\\U00110000]", "past the last one"),
    ('root ::= "a" [^\\x00-\\U0010FFFF]', "class in rule 'root' matches no character"),
    ("root ::= [\\uD800-\\uDFFF]", "matches no character"),
    ('root ::= "\\x00"', "NUL"),
    ('root ::= "\\uDC00"', "surrogate"),
    ("root ::= <[999999]>", "token <[999999]>"),
    ('root ::= x\nx ::= x? "a"', "rule 'x' is left-recursive"),
    # Left recursion hidden behind an optional (nullable) rule: llama.cpp's
    # own check misses some orders of these.
    ('root ::= opt root "a" | "b"\nopt ::= "c"?', "rule 'root' is left-recursive"),
    ('root ::= a\na ::= b c\nb ::= "x"*\nc ::= ("y")? a "z" | "w"', "left-recursive"),
    ('root ::= "a" root', "rule 'root' can never finish"),
    ('root ::= "x" | tail\ntail ::= "y" tail', "rule 'tail' can never finish"),
    ("root ::= " + "(" * 300 + '"a"' + ")" * 300, "nest deeper than"),
    ('root ::= "a"\x00 | "b"', "NUL character"),
    ('root ::= "\ud800"', "lone surrogate"),
]


@pytest.mark.parametrize(("grammar", "message"), REFUSED_GRAMMARS)
def test_unusable_grammar_is_refused_naming_the_rule(grammar: str, message: str) -> None:
    from xybrid.grammar import validate_grammar

    with pytest.raises(GrammarError) as info:
        validate_grammar(grammar, n_vocab=32000)
    assert message in str(info.value)


@pytest.mark.parametrize("grammar", [
    'root ::= [a-z]+ | ""',
    'root ::= "a" root | "b"',
    'root ::= a\na ::= "x" a | ""',
    "root ::= [^a]",
    "root ::= <[5]> | !<[5]>",
    'root ::= x* "a"\nx ::= "b"',
    "root ::= " + "(" * 100 + '"a"' + ")" * 100,
])
def test_usable_grammar_passes(grammar: str) -> None:
    from xybrid.grammar import validate_grammar

    assert validate_grammar(grammar, n_vocab=32000) == grammar


@pytest.mark.parametrize(("grammar", "message"), [
    ('root ::= "\\U00110000"', "past the last one"),
    ('root ::= "a" [^\\x00-\\U0010FFFF]', "matches no character"),
    ('root ::= "a" root', "can never finish"),
    ('root ::= opt root "a" | "b"\nopt ::= "c"?', "left-recursive"),
])
def test_backend_refuses_it_and_the_next_answer_is_fresh(backend: LlamaCppBackend, reference: str,
                                                         grammar: str, message: str) -> None:
    # Before: replacement characters (the first two), a reply cut only by
    # max_tokens, or llama.cpp's bare "left recursion at index 0".
    with pytest.raises(GrammarError, match=message):
        backend.generate_raw(PROMPT, GenerationConfig.greedy(max_tokens=8, grammar=grammar))
    assert_fresh(backend, reference)


# ---------------------------------------------------------------------------
# 2. Parameters: bounds that match the C side, checked in one place
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 2**31), ("top_k", 2**31), ("repetition_penalty_window", 2**31),
    ("logprobs", 2**63), ("max_tokens", 10**400),
    ("temperature", 1e39), ("frequency_penalty", -1e300), ("presence_penalty", 10**400),
    ("top_p", 10**400), ("repetition_penalty", 1e-50),
])
def test_generation_numbers_past_the_c_types_are_typed_errors(field: str, value: Any) -> None:
    with pytest.raises(InvalidInputError, match=f"GenerationConfig.{field}"):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [
    ("context_length", 2**31), ("n_batch", 2**40), ("n_ubatch", 2**31), ("gpu_layers", 2**31),
    ("n_threads", 513), ("parallel", 257), ("max_queued", 2**64),
])
def test_load_numbers_past_the_c_types_are_typed_errors(field: str, value: int) -> None:
    with pytest.raises(InvalidInputError, match=f"LlmConfig.{field}"):
        LlmConfig("model.gguf", **{field: value})


def test_engine_sampler_ints_past_a_c_int_are_typed_errors(tiny_llama_path: Path) -> None:
    from xybrid._native._engine import Model, Sampler

    model = Model(str(tiny_llama_path))
    for kwargs in ({"top_k": 2**31}, {"repeat_last_n": -2**40}, {"top_k": "3"},
                   {"temperature": 1e39}, {"frequency_penalty": 1e300}):
        with pytest.raises(InvalidInputError):
            Sampler(model, **kwargs)
    model.close()


def test_penalty_window_minus_one_is_the_whole_context(backend: LlamaCppBackend) -> None:
    def run(window: int) -> str:
        config = GenerationConfig.greedy(max_tokens=48, repetition_penalty=3.0,
                                         repetition_penalty_window=window)
        return backend.generate_raw(PROMPT, config).text

    whole = run(256)  # the fixture's context_length
    # -1 used to reach llama.cpp as "0", which turns the penalties off.
    assert run(-1) == whole
    assert run(0) != whole, "the penalty must change this reply, or the test proves nothing"
    # A window past the context is capped at it instead of allocating
    # 4 bytes per token of the window (2**31 - 1: 8 GiB).
    assert run(2**31 - 1) == whole
