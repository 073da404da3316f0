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


# ---------------------------------------------------------------------------
# 3. Every error a user can cause is an XybridError
# ---------------------------------------------------------------------------


def _deep_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(("make", "kind"), [
    # lone surrogates (what a broken JSON escape decodes to)
    (lambda: GenerationConfig(stop_sequences=["ok\ud800"]), InvalidInputError),
    (lambda: __import__("xybrid").ChatMessage.user("hi \udfff"), InvalidInputError),
    (lambda: GenerationConfig(grammar='root ::= "\ud800"'), None),  # checked when used
    # deep nesting: schemas, Python-side RecursionError before
    (lambda: __import__("xybrid.grammar").grammar.json_schema_to_gbnf(_deep_schema(3000)),
     GrammarError),
])
def test_untyped_errors_are_xybrid_errors(make: Any, kind: type[Exception] | None) -> None:
    if kind is None:
        make()
        return
    with pytest.raises(kind):
        make()


def test_surrogates_in_prompts_are_typed_and_leave_the_backend_fresh(
        backend: LlamaCppBackend, reference: str) -> None:
    from xybrid import ChatMessage

    with pytest.raises(InvalidInputError, match="lone surrogate U\\+D800"):
        backend.generate_raw("a\ud800b", GenerationConfig.greedy(max_tokens=4))
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        backend.generate_raw("ok", GenerationConfig.greedy(max_tokens=4, grammar='root ::= "\ud801"'))
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        backend.generate([ChatMessage("user", "fine", name="n\udc00")],
                         GenerationConfig.greedy(max_tokens=4))
    # NUL is a character: it is tokenized, not an error.
    backend.generate_raw("a\x00b", GenerationConfig.greedy(max_tokens=2))
    assert_fresh(backend, reference)


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "f", "arguments": ' + "[" * 50_000 + "]" * 50_000 + "}</tool_call>",
    '<tool_call>{"name": "f", "arguments": "' + "[" * 50_000 + '"}</tool_call>',
    "[f(a=" + "[" * 5000 + "]" * 5000 + ")]",
    "<start_function_call>call:f{a:" + "{x:" * 5000 + "1" + "}" * 5001 + "<end_function_call>",
])
def test_deeply_nested_tool_call_text_is_text_or_a_tool_call_error(text: str) -> None:
    from xybrid.errors import ToolCallError
    from xybrid.tool_calls import ToolCallParser, parse_tool_calls

    try:
        parse_tool_calls(text)
    except ToolCallError:
        pass  # typed: the model began a call that does not parse
    parser = ToolCallParser("auto", tool_names=("f",))
    try:
        for i in range(0, len(text), 97):  # chunk by chunk, as a stream delivers it
            parser.feed(text[i:i + 97])
        parser.finish()
    except ToolCallError:
        pass


@pytest.mark.parametrize("template", [
    "{% for m in messages %}" * 120 + "x" + "{% endfor %}" * 120,   # IndentationError
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",                   # RecursionError
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",        # RecursionError in render
])
def test_deep_templates_are_invalid_input(tiny_llama_path: Path, template: str) -> None:
    from xybrid import ChatMessage

    with pytest.raises(InvalidInputError, match="chat template"):
        with LlamaCppBackend(tiny_config(tiny_llama_path).replace(chat_template=template)) as b:
            b.generate([ChatMessage.user("hi")], GenerationConfig.greedy(max_tokens=2))


@pytest.mark.parametrize("path", [
    "/tmp/" + "a" * 5000 + ".gguf",   # ENAMETOOLONG
    "/dev/null",                      # neither a file nor a folder
    "model\x00.gguf",                 # NUL byte
    "/proc/self/fd/../\udcff",         # undecodable name
])
def test_unusable_model_paths_are_model_not_found(path: str) -> None:
    from xybrid.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        LlamaCppBackend(LlmConfig(path)).load()


@pytest.mark.parametrize("argv", [
    ["generate", "hi", "--model", "/tmp/" + "a" * 5000],
    ["generate", "hi", "--model", "{model}", "--max-tokens", str(2**40)],
    ["generate", "hi", "--model", "{model}", "--top-k", str(2**40)],
    ["generate", "hi", "--model", "{model}", "--temperature", "1e39"],
    ["generate", "hi", "--model", "{model}", "--ctx-size", str(2**40)],
    ["generate", "\udcff", "--model", "{model}"],
    ["generate", "hi", "--model", "{model}", "--stop", "\udcfe"],
])
def test_cli_prints_one_error_line_never_a_traceback(tiny_llama_path: Path, argv: list[str]) -> None:
    argv = [a.replace("{model}", str(tiny_llama_path)) for a in argv]
    proc = run_child("""
        import sys
        from xybrid.cli import main
        sys.exit(main(sys.argv[1:]))
    """, *argv)  # (a lone surrogate reaches the child as an undecodable byte, and back)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("xybrid: error: "), proc.stderr[-2000:]


# ---------------------------------------------------------------------------
# 4. Work is bounded before it is done
# ---------------------------------------------------------------------------


def test_a_prompt_far_past_the_context_is_refused_before_tokenizing(
        backend: LlamaCppBackend, reference: str) -> None:
    import time

    from xybrid import ChatMessage
    from xybrid.errors import ContextOverflowError

    huge = "lorem ipsum " * 4_000_000  # 48 MB: tokenizing it took a minute and gigabytes
    start = time.monotonic()
    with pytest.raises(ContextOverflowError, match="characters, more than the"):
        backend.generate_raw(huge, GenerationConfig.greedy(max_tokens=2))
    with pytest.raises(ContextOverflowError, match="characters, more than the"):
        backend.generate([ChatMessage.user(huge)], GenerationConfig.greedy(max_tokens=2))
    assert time.monotonic() - start < 5
    assert_fresh(backend, reference)


def test_the_text_bound_never_refuses_what_fits(backend: LlamaCppBackend) -> None:
    # The bound is exact in one direction: n_ctx * (longest token) bytes.
    model = backend._require().model  # the loaded engine model
    longest = model.max_piece_bytes
    assert longest >= 1
    assert max(len(model.token_to_piece(t, special=True)) for t in range(model.n_vocab)) == longest


@pytest.mark.parametrize(("template", "message"), [
    # nested loops that ran for hours holding the backend
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "steps"),
    ("{{ 'x' * 1000000000 }}", "'\\*' would build"),
    ("{{ 10 ** 100000000 }}", "'\\*\\*' would build"),
    # ('~' is measured before it joins, since the sandbox's own bounds)
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "'~' would build"),
    ("{% macro d(s, n) %}{{ d(s ~ s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 40) }}",
     "'~' would build"),
    ("{% macro d(s, n) %}{{ d(s + s, n - 1) if n else s }}{% endmacro %}{{ d('ab', 40) }}",
     "'\\+' would build|built a value"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "output passed"),
])
def test_template_rendering_has_a_work_bound(tiny_llama_path: Path, template: str,
                                              message: str) -> None:
    import time

    from xybrid import ChatMessage

    start = time.monotonic()
    with LlamaCppBackend(tiny_config(tiny_llama_path).replace(chat_template=template)) as b:
        with pytest.raises(InvalidInputError, match=message):
            b.generate([ChatMessage.user("hi")], GenerationConfig.greedy(max_tokens=2))
    assert time.monotonic() - start < 30


def test_bounded_rendering_restores_the_previous_tracer() -> None:
    from xybrid.chat_templates import JinjaChatTemplate
    from xybrid.types import ChatMessage

    def tracer(frame: Any, event: str, arg: Any) -> None:
        return None

    sys.settrace(tracer)
    try:
        out = JinjaChatTemplate("{% for m in messages %}[{{ m.content }}]{% endfor %}").render(
            [ChatMessage.user("a"), ChatMessage.user("b")])
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert out == "[a][b]"


# ---------------------------------------------------------------------------
# Fixes of an earlier session, verified here
# ---------------------------------------------------------------------------


def test_a_refused_request_does_not_corrupt_the_cached_prefix(backend: LlamaCppBackend,
                                                              reference: str) -> None:
    # The cache holds PROMPT and more; refused requests with other prompts
    # must not cut it while its record still describes the old contents.
    backend.generate_raw(PROMPT + " jumps over", GenerationConfig.greedy(max_tokens=6))
    refusals = [
        GenerationConfig.greedy(max_tokens=4, grammar="root ::= [b-a]"),
        GenerationConfig.greedy(max_tokens=4, json_schema={"type": "string", "pattern": "a+"}),
        GenerationConfig.greedy(max_tokens=4, grammar="root ::= <[2]> \"a\""),  # fails while decoding
    ]
    for config in refusals:
        with pytest.raises(XybridError):
            backend.generate_raw("A different prompt altogether", config)
        assert_fresh(backend, reference)


def test_failed_loads_free_their_handles_in_order(tiny_llama_path: Path) -> None:
    # A broken chat template fails the load after the model and context
    # exist; the traceback cycle once left both to the cyclic GC, which freed
    # the model first (use-after-free). Many times over, in a child.
    proc = run_child("""
        import gc, sys
        from xybrid import LlamaCppBackend, LlmConfig
        from xybrid.errors import InvalidInputError
        for i in range(30):
            try:
                LlamaCppBackend(LlmConfig(sys.argv[1], context_length=128, n_threads=1,
                                          chat_template="{% for x in %}")).load()
            except InvalidInputError as exc:
                err = exc
            gc.collect()
        print("survived", type(err).__name__)
    """, str(tiny_llama_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived InvalidInputError" in proc.stdout


# ---------------------------------------------------------------------------
# Media bounds: measured before the expensive step (found by the media fuzz
# suite in tests/test_fuzz.py, or by reading mtmd)
# ---------------------------------------------------------------------------

def _png_declaring(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _one_frame_wav() -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x01\x00")
    return buf.getvalue()


@pytest.mark.parametrize(("make", "match"), [
    # a 300-byte PNG declaring 100k x 100k (30 GB of RGB); Pillow's own bomb
    # error was an untyped DecompressionBombError
    (lambda: _png_declaring(100_000, 100_000), "could not be decoded|too large"),
    (lambda: _png_declaring(16385, 16), "side is too large"),
    (lambda: _png_declaring(8000, 8000), r"pixels, the limit is 40000000"),
    (lambda: __import__("numpy").broadcast_to(__import__("numpy").uint8(0), (100_000, 100_000, 3)),
     "side is too large"),
])
def test_images_are_measured_before_decoding(make: Any, match: str) -> None:
    import time

    from xybrid.media import Image, image_to_rgb

    start = time.monotonic()
    with pytest.raises(InvalidInputError, match=match):
        image_to_rgb(Image(make()))
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(("make", "match"), [
    # mtmd hands non-audio bytes to its image decoder, into an audio slot
    (lambda: _png_declaring(4000, 4000), "not a wav, mp3 or flac"),
    # 64 MiB of false mp3 sync words: a decoder scans them all
    (lambda: b"\xff" * (8 * 1024 * 1024), "false frame headers"),
    # one sample: GGML_ASSERT(buf.size() > sizeof(float)) in mtmd aborted
    (lambda: memoryview(b"\x00" * 4), "fewer than 2 samples"),
    (lambda: __import__("numpy").zeros(1, "float32"), "fewer than 2"),
    (lambda: __import__("numpy").broadcast_to(__import__("numpy").float32(0), (2**31,)), "too large"),
    (lambda: memoryview(b"\x00\x00\xc0\x7f" * 4), "NaN"),
    (lambda: b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00"
             b"\x00\x00\x00\x00\x02\x00\x10\x00data\x00\x00\x00\x00", "sample rate is 0 Hz"),
    (lambda: "/dev/zero", "not a regular file"),
    (lambda: "/tmp/" + "a" * 5000 + ".wav", "cannot be used"),
    (lambda: "\ud800.wav", "not encodable"),
])
def test_audio_is_measured_before_mtmd(make: Any, match: str) -> None:
    from xybrid.media import Audio, audio_to_item

    with pytest.raises(InvalidInputError, match=match):
        audio_to_item(Audio(make()), 16000)


def test_a_one_sample_clip_is_refused_by_the_engine_too(tmp_path: Path) -> None:
    # The engine-level check (a WAV that decodes to one sample), in a child:
    # before it, mtmd aborted the process.
    from xybrid.testing.tiny_models import write_tiny_vlm

    model, mmproj = write_tiny_vlm(tmp_path, vision=False, audio=True)
    wav = tmp_path / "one.wav"
    wav.write_bytes(_one_frame_wav())
    proc = run_child("""
        import sys
        from xybrid._native import _engine
        from xybrid.errors import InvalidInputError
        model = _engine.Model(sys.argv[1])
        mm = _engine.Multimodal(model, sys.argv[2], n_threads=1)
        for item in [("audio", b"\\0" * 4), ("audio_file", open(sys.argv[3], "rb").read())]:
            try:
                mm.tokenize(mm.marker, [item])
            except InvalidInputError as exc:
                print("refused:", exc)
    """, str(model), str(mmproj), str(wav))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused:") == 2, proc.stdout


# ---------------------------------------------------------------------------
# Jinja: work that the sandbox once did before (or without) any bound. Each
# took seconds and a gigabyte or more, hung, or raised MemoryError; now each
# is InvalidInputError at once, whether the template is the user's or the
# GGUF's (both are compiled by the same environment).
# ---------------------------------------------------------------------------

HOSTILE_TEMPLATES = [
    # compile-time constant folding ran these while compiling
    "{{ '%999999999d' % 1 }}",
    "{{ ('%' ~ '999999999d') % 1 }}",
    "{{ 'a'|center(999999999) }}",
    '{{ "%.999999999f" % 1.0 }}',
    '{{ "%-999999999s"|format("x") }}',
    "{% if ('a'|center(10**9)) %}{% endif %}",
    # widths and amplifying methods at render time
    "{% set w = 999999999 %}{{ '%*d' % (w, 1) }}",
    "{{ '%(a)999999999s' % {'a': 1} }}",
    "{{ '{:999999999}'.format(1) }}",
    "{{ '{0:{1}}'.format('a', 999999999) }}",
    "{{ ('{:9999999}' * 1000).format(*range(1000)) }}",
    "{{ 'a'.ljust(999999999) }}",
    "{{ '1'.zfill(999999999) }}",
    "{{ ('\t' * 100).expandtabs(10**7) }}",
    "{{ ('a' * 1000).replace('', 'x' * 100000) }}",
    "{{ ('a' * 8000000).translate({97: 'b' * 8000000}) }}",
    "{{ ('x' * 8000000).join(range(100000)|map('string')) }}",
    "{{ range(100000)|join('x' * 8000000) }}",
    "{{ range(100)|map('center', 10**9)|list }}",
    "{{ 'a'|indent(999999999, true) }}",
    "{{ ('x\n' * 1000)|indent('a' * 10000) }}",
    "{{ range(3)|batch(10**9, 0)|list|length }}",
    "{{ range(3)|slice(10**9)|list|length }}",
    "{{ [[1]]|tojson(indent=999999999) }}",
    "{{ ('a' * 1000000)|wordwrap(1) }}",
    "{{ ('a.b ' * 1000000)|urlize|length }}",
    "{{ lipsum(100000) }}",
    "{{ lipsum(1, max=10**9) }}",
    # shared references: a list of one string many times, printed
    "{% set s = 'x' * 8000000 %}{% set l = [s] * 8000000 %}{{ l }}",
    "{% set s = 'x' * 8000000 %}{% set l = [s] * 8000000 %}{{ l|tojson }}",
    "{% set s = 'x' * 100000 %}{% set a = [s, s] %}{% set b = [a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c] %}{{ d|string }}",
    "{% set l = [[0] * 80] * 100000 %}{{ l|sum(start=[])|length }}",
    # integers squared in a namespace: 40 steps, 2**40 bits
    "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}"
    "{{ ns.x > 0 }}",
    # a template far larger than any chat template
    "{{ 1 }}" * 200_000,
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES, ids=lambda t: t[:60])
@pytest.mark.parametrize("where", ["user", "gguf"])
def test_hostile_templates_are_refused_at_once(template: str, where: str) -> None:
    import time

    from xybrid.chat_templates import resolve_chat_template
    from xybrid.types import ChatMessage

    start = time.monotonic()
    with pytest.raises(InvalidInputError, match="chat template"):
        chosen = resolve_chat_template(template if where == "user" else None,
                                       template if where == "gguf" else None, "llama")
        chosen.render([ChatMessage.user("hi")])
    assert time.monotonic() - start < 3


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ '%5d|%-3s|%.2f' % (42, 'a', 1.5) }}", "   42|a  |1.50"),
    ("{{ '{:>4}{}'.format('x', 1) }}", "   x1"),
    ("{{ 'a'|center(5) }}|{{ 'a\nb'|indent(2) }}|{{ [1, 2]|join('-') }}", "  a  |a\n  b|1-2"),
    ("{{ messages[0].content ~ '!' }}{{ {'a': 1}|tojson(indent=2) }}", 'hi!{\n  "a": 1\n}'),
    ("{{ ('ab' * 3)|replace('b', 'cd') }}{{ [[1], [2]]|sum(start=[]) }}", "acdacdacd[1, 2]"),
])
def test_the_bounds_leave_ordinary_templates_alone(template: str, expected: str) -> None:
    from xybrid.chat_templates import JinjaChatTemplate
    from xybrid.types import ChatMessage

    assert JinjaChatTemplate(template).render([ChatMessage.user("hi")]) == expected
