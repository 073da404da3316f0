"""Bad input to the engine: every case raises a typed xybrid error that names
the problem, nothing crashes, and the model/context keep working afterwards.

Cases that used to abort the whole process inside llama.cpp (a GGML_ASSERT)
are also run in a child process, so that a regression shows up as one failed
test instead of killing the test session.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from xybrid._native._engine import Context, Model, Sampler
from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    GrammarError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    XybridError,
)
from xybrid.model_files import resolve_model_path

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    model = Model(str(tiny_llama_path))
    yield model
    model.close()


@pytest.fixture(scope="module")
def tiny_ctx(tiny):
    ctx = Context(tiny, n_ctx=256, n_batch=64, n_threads=1)
    yield ctx
    ctx.close()


@pytest.fixture(scope="module")
def tiny_ref(tiny, tiny_ctx):
    sampler = Sampler(tiny, temperature=0.0)
    tiny_ctx.memory_clear()
    ref = tiny_ctx.generate(tiny.tokenize(PROMPT), sampler, max_tokens=8)
    tiny_ctx.memory_clear()
    return ref


@pytest.fixture
def check_usable(tiny, tiny_ctx, tiny_ref):
    """Call after a failure: the context (and model) still give the reference."""

    def check() -> None:
        tiny_ctx.memory_clear()
        again = tiny_ctx.generate(tiny.tokenize(PROMPT), Sampler(tiny, temperature=0.0), max_tokens=8)
        assert again.tokens == tiny_ref.tokens
        assert again.text == tiny_ref.text
        tiny_ctx.memory_clear()

    tiny_ctx.memory_clear()
    yield check
    check()


# --------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match="not found") as info:
        Model(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError):
        Model(missing)  # os.PathLike works too
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model_path(missing)


def test_directory_is_refused_by_the_engine(tmp_path, tiny_llama_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="directory"):
        Model(str(empty))
    with pytest.raises(ModelNotFoundError, match="no .gguf"):
        resolve_model_path(empty)

    full = tmp_path / "full"
    full.mkdir()
    (full / "README.md").write_text("not a model")
    (full / "mmproj-model.gguf").write_bytes(tiny_llama_path.read_bytes())
    (full / "model.gguf").write_bytes(tiny_llama_path.read_bytes())
    with pytest.raises(ModelLoadError, match="directory"):
        Model(str(full))
    chosen = resolve_model_path(full)
    assert chosen == full / "model.gguf"  # the projector is skipped
    with Model(str(chosen)) as model:
        assert model.architecture == "llama"
    assert model.closed


@pytest.mark.parametrize("content", [b"", b"GG", b"hello, I am a text file\n" * 100, b"\x00" * 4096],
                         ids=["empty", "2-bytes", "text", "zeros"])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a GGUF file") as info:
        Model(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.05, 0.5, 0.99, "minus-1"])
def test_truncated_tiny_llama(tmp_path, tiny_llama_path, fraction):
    data = tiny_llama_path.read_bytes()
    n = len(data) - 1 if fraction == "minus-1" else max(4, int(len(data) * fraction))
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:n])
    with pytest.raises(ModelLoadError, match="could not load") as info:
        Model(str(path))
    message = str(info.value)
    # xybrid.gguf_check finds the truncation before llama.cpp reads the file
    # and says where: in the header or metadata, or in a tensor's data.
    assert "the file is truncated or corrupt" in message, message
    assert str(path) in message


@pytest.mark.parametrize("n", [4, 4096, 2_000_000, 30_000_000])
def test_truncated_gemma(tmp_path, gemma_path, n):
    path = tmp_path / "gemma-truncated.gguf"
    with open(gemma_path, "rb") as src:
        path.write_bytes(src.read(n))
    with pytest.raises(ModelLoadError, match="could not load"):
        Model(str(path))


def test_bad_gguf_version(tmp_path, tiny_llama_path):
    data = bytearray(tiny_llama_path.read_bytes()[:4096])
    data[4:8] = (999).to_bytes(4, "little")
    path = tmp_path / "future.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="version 999"):
        Model(str(path))


def test_bad_model_arguments(tiny_llama_path):
    with pytest.raises(InvalidInputError, match="str or os.PathLike"):
        Model(123)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="gpu_layers"):
        Model(str(tiny_llama_path), gpu_layers=-2)


def test_vocab_only_model_has_no_context(tiny_llama_path):
    with Model(str(tiny_llama_path), vocab_only=True) as model:
        assert model.tokenize("hi")
        with pytest.raises(InvalidInputError, match="vocab-only"):
            Context(model)


# --------------------------------------------------------------------------
# contexts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    ({"n_ctx": 0}, "n_ctx"), ({"n_ctx": -5}, "n_ctx"), ({"n_ctx": 1.5}, "n_ctx"),
    ({"n_ctx": True}, "n_ctx"), ({"n_ctx": 2**32}, "n_ctx"),
    ({"n_batch": -1}, "n_batch"), ({"n_batch": 0}, "n_batch"), ({"n_ubatch": 0}, "n_ubatch"),
    ({"n_seq_max": 0}, "n_seq_max"), ({"n_threads": -1}, "n_threads"),
    ({"n_threads_batch": -2}, "n_threads_batch"), ({"n_batch": "64"}, "n_batch"),
])
def test_bad_context_sizes(tiny, kwargs, name):
    with pytest.raises(InvalidInputError, match=name):
        Context(tiny, **kwargs)


def test_context_llama_refuses(tiny):
    # Passes our checks, refused by llama.cpp: its reason is quoted.
    with pytest.raises(XybridError, match="n_seq_max"):
        Context(tiny, n_ctx=256, n_seq_max=10_000)


def test_closed_objects(tiny_llama_path):
    model = Model(str(tiny_llama_path))
    ctx = Context(model, n_ctx=256, n_threads=1)
    with pytest.raises(XybridError, match="context"):
        model.close()  # a context still uses it
    ctx.close()
    ctx.close()  # idempotent
    with pytest.raises(XybridError, match="closed"):
        ctx.decode([1, 2])
    with pytest.raises(XybridError, match="closed"):
        ctx.n_ctx
    sampler = Sampler(model, temperature=0.0, grammar='root ::= "a"')
    model.close()
    with pytest.raises(XybridError, match="closed"):
        model.tokenize("x")
    with pytest.raises(XybridError, match="closed"):
        Context(model)
    with pytest.raises(XybridError, match="closed"):
        Sampler(model)
    with pytest.raises(XybridError, match="closed"):
        sampler.reset()  # would rebuild the grammar from the freed vocabulary
    assert "closed" in repr(model)


# --------------------------------------------------------------------------
# prompts and generation arguments
# --------------------------------------------------------------------------


def test_prompt_longer_than_context(tiny, tiny_ctx, check_usable):
    sampler = Sampler(tiny, temperature=0.0)
    n_ctx = tiny_ctx.n_ctx
    long_prompt = tiny.tokenize("hello " * (n_ctx + 10))
    assert len(long_prompt) > n_ctx
    with pytest.raises(ContextOverflowError, match=f"context holds {n_ctx}"):
        tiny_ctx.generate(long_prompt, sampler)
    with pytest.raises(ContextOverflowError):
        list(tiny_ctx.stream(long_prompt, sampler))
    # exactly full leaves no room to generate
    with pytest.raises(ContextOverflowError):
        tiny_ctx.generate(long_prompt[:n_ctx], sampler)
    # n_past counts
    with pytest.raises(ContextOverflowError):
        tiny_ctx.generate(long_prompt[:10], sampler, n_past=n_ctx - 5)
    with pytest.raises(ContextOverflowError, match="do not fit"):
        tiny_ctx.decode(long_prompt)
    with pytest.raises(ContextOverflowError):
        tiny_ctx.decode([1, 2, 3], pos0=n_ctx - 2)
    assert isinstance(ContextOverflowError("x"), InvalidInputError)
    check_usable()


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"n_past": -1}, "n_past"), ({"seq_id": 1}, "seq_id"), ({"seq_id": -1}, "seq_id"),
    ({"stop": [""]}, "stop"), ({"stop": ["ok", 5]}, "stop"), ({"stop": [None]}, "stop"),
])
def test_bad_generation_arguments(tiny, tiny_ctx, check_usable, kwargs, match):
    sampler = Sampler(tiny, temperature=0.0)
    tokens = tiny.tokenize(PROMPT)
    with pytest.raises(InvalidInputError, match=match):
        tiny_ctx.generate(tokens, sampler, **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        tiny_ctx.stream(tokens, sampler, **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        tiny_ctx.generate(tokens, sampler, on_text=lambda c: None, **kwargs)
    check_usable()


def test_empty_prompt(tiny, tiny_ctx, check_usable):
    sampler = Sampler(tiny, temperature=0.0)
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_ctx.generate([], sampler)
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_ctx.stream([], sampler)
    with pytest.raises(InvalidInputError, match="empty"):
        tiny_ctx.decode([])
    assert tiny.tokenize("", add_special=False) == []
    check_usable()


def test_non_string_to_tokenize(tiny, check_usable):
    for bad in (None, b"bytes", 42, ["a"]):
        with pytest.raises(InvalidInputError, match="text must be a str"):
            tiny.tokenize(bad)  # type: ignore[arg-type]
    check_usable()


@pytest.mark.parametrize("bad", [-1, 32000, 10**6, "7", 1.0, True, None])
def test_invalid_token_ids(tiny, tiny_ctx, check_usable, bad):
    sampler = Sampler(tiny, temperature=0.0)
    tokens = tiny.tokenize(PROMPT) + [bad]
    with pytest.raises(InvalidInputError, match="not a token id"):
        tiny_ctx.generate(tokens, sampler)
    with pytest.raises(InvalidInputError, match="not a token id"):
        tiny_ctx.decode(tokens)
    with pytest.raises(InvalidInputError, match="not a token id"):
        tiny.detokenize(tokens)
    if isinstance(bad, int) and not isinstance(bad, bool):
        with pytest.raises(InvalidInputError, match="outside the vocabulary"):
            tiny.token_to_piece(bad)
        with pytest.raises(InvalidInputError, match="outside the vocabulary"):
            tiny.is_eog(bad)
        with pytest.raises(InvalidInputError, match="outside the vocabulary"):
            sampler.accept(bad)
    check_usable()


def test_stale_cache_is_a_generation_error(tiny, tiny_ctx, check_usable):
    """Starting at n_past=0 over a cache that still holds the previous run is
    refused by llama.cpp (positions must continue the sequence): a
    GenerationError, and a memory_clear makes the context usable again."""
    sampler = Sampler(tiny, temperature=0.0)
    tokens = tiny.tokenize(PROMPT)
    tiny_ctx.generate(tokens, sampler, max_tokens=4)
    with pytest.raises(GenerationError, match="prefill"):
        tiny_ctx.generate(tokens, sampler, max_tokens=4)
    with pytest.raises(GenerationError, match="llama_decode failed"):
        tiny_ctx.decode(tokens, pos0=0)
    assert isinstance(GenerationError("x"), RuntimeError)
    check_usable()


def test_bad_sequence_ids(tiny, tiny_ctx, check_usable):
    # llama.cpp GGML_ASSERTs on these; the engine refuses them first.
    for seq in (1, 5, 300, -2):
        with pytest.raises(InvalidInputError, match="seq_id"):
            tiny_ctx.seq_pos_max(seq)
        with pytest.raises(InvalidInputError, match="seq_id"):
            tiny_ctx.seq_rm(seq)
        with pytest.raises(InvalidInputError, match="seq_id"):
            tiny_ctx.decode([1, 2], seq_id=seq)
    assert tiny_ctx.seq_rm(-1) is True  # -1: every sequence
    check_usable()


def test_missing_logits(tiny, check_usable):
    """No crash when there is nothing to sample from."""
    ctx = Context(tiny, n_ctx=256, n_threads=1)
    try:
        sampler = Sampler(tiny, temperature=0.0)
        with pytest.raises(XybridError, match="no logits"):
            ctx.logits()
        with pytest.raises(XybridError, match="no logits"):
            sampler.sample(ctx)
        with pytest.raises(XybridError, match="no logits"):
            ctx.generate([], sampler, logits_ready=True)
        ctx.decode(tiny.tokenize(PROMPT))
        with pytest.raises(XybridError, match="no logits for output 3"):
            ctx.logits(3)
        with pytest.raises(XybridError, match="no logits for output 3"):
            sampler.sample(ctx, 3)
        assert 0 <= sampler.sample(ctx) < tiny.n_vocab
        with pytest.raises(InvalidInputError, match="no prompt"):
            ctx.generate([5], sampler, logits_ready=True)
    finally:
        ctx.close()
    check_usable()


# --------------------------------------------------------------------------
# samplers and grammars
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": 1.01}, "min_p"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"), ({"repeat_penalty": -1.0}, "repeat_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"), ({"frequency_penalty": math.inf}, "frequency_penalty"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed"), ({"seed": "42"}, "seed"), ({"seed": True}, "seed"),
])
def test_bad_sampler_params(tiny, check_usable, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        Sampler(tiny, **kwargs)
    check_usable()


@pytest.mark.parametrize("grammar, match", [
    # The Sampler runs validate_grammar first, which names the problem.
    ('root ::= "a', "unterminated string literal"),
    ("root ::= undefined-rule", "used but never defined"),
    ("this is not gbnf", "expected '::='"),
    ("root ::= [a-", "unterminated character class"),
    ("root ::= <not-a-token>", "rejected"),        # only llama.cpp knows the vocabulary's texts
    ("", "empty"), ("   \n", "empty"),
])
def test_invalid_grammar(tiny, tiny_ctx, check_usable, grammar, match):
    with pytest.raises(GrammarError, match=match) as info:
        Sampler(tiny, temperature=0.0, grammar=grammar)
    assert isinstance(info.value, InvalidInputError)
    check_usable()


def test_grammar_errors_quote_llama_cpp(tiny):
    # llama.cpp's parser prints the detailed reason with fprintf to stderr,
    # outside its log callback, so the engine can only quote the logged
    # summary. (Most grammars it refuses are refused by validate_grammar
    # first; a token text the vocabulary lacks only llama.cpp can see.)
    with pytest.raises(GrammarError, match="failed to parse grammar") as info:
        Sampler(tiny, grammar="root ::= <not-a-token>")
    assert "llama.cpp rejected the grammar" in str(info.value)
    with pytest.raises(GrammarError, match="root"):
        Sampler(tiny, grammar='start ::= "a"')  # no rule named root
    with pytest.raises(GrammarError):
        Sampler(tiny, grammar='start ::= "a"', grammar_root="missing")
    with pytest.raises(GrammarError, match="GBNF"):
        Sampler(tiny, grammar=42)  # type: ignore[arg-type]
    # a good grammar works and constrains the output
    sampler = Sampler(tiny, temperature=0.0, grammar='start ::= "yes" | "no"', grammar_root="start")
    ctx = Context(tiny, n_ctx=256, n_threads=1)
    try:
        result = ctx.generate(tiny.tokenize(PROMPT), sampler, max_tokens=10)
        assert result.text in ("yes", "no")
        assert result.stop_reason == "eog"
    finally:
        ctx.close()


# --------------------------------------------------------------------------
# no crash: the cases that used to abort the process, in a child
# --------------------------------------------------------------------------


CHILD = textwrap.dedent('''
    import sys
    from xybrid._native._engine import Context, Model, Sampler
    from xybrid.errors import XybridError

    model = Model(sys.argv[1])
    ctx = Context(model, n_ctx=256, n_threads=1)
    sampler = Sampler(model, temperature=0.0)
    probes = [
        ("sample before any decode", lambda: sampler.sample(ctx)),
        ("logits_ready before any decode", lambda: ctx.generate([], sampler, logits_ready=True)),
        ("seq_pos_max(-1)", lambda: ctx.seq_pos_max(-1)),
        ("seq_pos_max(300)", lambda: ctx.seq_pos_max(300)),
        ("seq_rm(300)", lambda: ctx.seq_rm(300)),
        ("decode then sample index 9", lambda: (ctx.decode([1, 2, 3]), sampler.sample(ctx, 9))),
    ]
    for name, probe in probes:
        try:
            probe()
        except XybridError as exc:
            print(f"ok {name}: {type(exc).__name__}", flush=True)
        else:
            print(f"NO ERROR {name}", flush=True)
    print("survived", flush=True)
''')


def test_no_process_abort(tiny_llama_path, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(CHILD)
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "survived"
    assert all(line.startswith("ok ") for line in lines[:-1]), proc.stdout
    assert len(lines) == 7
