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

# Grammars llama.cpp parses but that allow no token at the first step. Before
# the shim, accepting the token the chain picked anyway threw
# std::runtime_error through C ("terminate called ...") or hit GGML_ABORT.
# (Code points past U+10FFFF and classes that exclude every character are
# not here: llama.cpp lets partial UTF-8 bytes through for them, so the reply
# is replacement characters rather than an abort. validate_grammar refuses
# those; see the validator tests below.)
DEAD_GRAMMARS = [
    "root ::= [b-a]",               # an empty character range
    "root ::= <[999999]>",          # a token id the vocabulary does not have
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
