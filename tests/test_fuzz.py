"""Fuzz suites (Hypothesis) over the public API, with the real extension.

Each suite draws hostile inputs of one kind: GBNF grammars (random and built
from the shapes that once killed the process), sampling parameters, prompts
(any Unicode, NUL, lone surrogates), token lists, tool-call text fed chunk
by chunk, media (image and audio bytes, mutated real files, declared sizes,
arrays of any shape and dtype, paths, content parts) and chat templates. The properties, for every input:

- no crash: requests that reach llama.cpp run in a child process
  (tests/fuzz_child.py), so an abort fails the test with the input instead of
  killing the session; no hang: every request must answer within a deadline;
- only typed errors: anything raised is an XybridError;
- the invariant after every failure: the next valid call returns exactly
  what a fresh backend returns (greedy, tiny model).

Size: ``XYBRID_FUZZ_EXAMPLES`` examples per suite (default 40, a CI-sized
run of well under a minute on two cores); set it higher for a long local
run, e.g. ``XYBRID_FUZZ_EXAMPLES=2000``. ``XYBRID_FUZZ_REPORT=path.json``
writes what was tried and found per suite.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import os
import select
import struct
import subprocess
import sys
import tempfile
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from xybrid.errors import GrammarError, XybridError
from xybrid.grammar import validate_grammar
from xybrid.tool_calls import ToolCallParser, parse_tool_calls

EXAMPLES = int(os.environ.get("XYBRID_FUZZ_EXAMPLES", "40"))
LONG_RUN = EXAMPLES > 40
# A request on the tiny model takes milliseconds; one that takes this long hangs.
DEADLINE_S = 60.0

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,             # nothing written into the checkout
    derandomize=not LONG_RUN,  # the CI-sized run is the same every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)

STATS: dict[str, dict[str, int]] = {}


def _count(suite: str, key: str) -> None:
    STATS.setdefault(suite, {"tried": 0, "typed_errors": 0, "crashes": 0, "hangs": 0,
                             "untyped_errors": 0, "wrong_after_failure": 0})
    STATS[suite][key] += 1


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("XYBRID_FUZZ_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        old.update(STATS)
        Path(path).write_text(json.dumps(old, indent=2, sort_keys=True))


class Child:
    """tests/fuzz_child.py (or another child ``script`` beside it),
    restarted after it dies. ``models``: the tiny model, then optionally a
    text model and projector for media requests."""

    def __init__(self, *models: Path, script: str = "fuzz_child.py") -> None:
        self.models = models
        self.script = script
        self.proc: subprocess.Popen[str] | None = None
        self.log: Any = None

    def _log(self) -> Any:
        if self.log is not None:
            self.log.close()
        self.log = tempfile.TemporaryFile()
        return self.log

    def start(self) -> None:
        script = Path(__file__).with_name(self.script)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *map(str, self.models)], stdin=subprocess.PIPE,
            # stderr to a file: llama.cpp and mtmd log every request, and a full
            # pipe nobody reads would block the child (a false "hang").
            stdout=subprocess.PIPE, stderr=self._log(), text=True,
            cwd=tempfile.gettempdir(), env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        assert json.loads(self._read(120)) == {"ready": True}

    def _read(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        return self.proc.stdout.readline()

    def request(self, suite: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        _count(suite, "tried")
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._read(DEADLINE_S)
        except TimeoutError:
            _count(suite, "hangs")
            self.stop()
            pytest.fail(f"hang: no answer within {DEADLINE_S} s to {payload!r:.500}")
        if not line:
            _count(suite, "crashes")
            self.log.seek(0)
            err = self.log.read().decode("utf-8", "replace")
            self.proc = None
            pytest.fail(f"crash: the child died on {payload!r:.500}\n{err[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        if reply["outcome"] == "xybrid":
            _count(suite, "typed_errors")
        if reply["outcome"] == "untyped":
            _count(suite, "untyped_errors")
            pytest.fail(f"untyped error {reply['error']} on {payload!r:.500}")
        if not reply["fresh"]:
            _count(suite, "wrong_after_failure")
            pytest.fail(f"the next valid call differs from a fresh backend after {payload!r:.500}"
                        f" ({reply['error']})")
        return reply

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def child(tiny_llama_path: Path) -> Iterator[Child]:
    c = Child(tiny_llama_path)
    yield c
    c.stop()


# ---------------------------------------------------------------------------
# GBNF grammars
# ---------------------------------------------------------------------------

RULES = ["root", "a", "b", "item"]
# Code points with a bias to the edges: NUL, ASCII, surrogates, the last
# character and past it.
CODE_POINTS = st.one_of(
    st.integers(0x61, 0x7A), st.integers(0x20, 0x7E), st.integers(0x61, 0x7A),
    st.integers(0, 0x7F), st.integers(0xD7F0, 0xE010), st.integers(0x10FFF0, 0x110010),
    st.integers(0, 0x10FFFF))


def _escape(cp: int) -> str:
    if cp > 0xFFFF:
        return f"\\U{cp:08X}"
    if cp > 0xFF or cp < 0x20 or chr(cp) in '"\\[]-^':
        return f"\\u{cp:04X}" if cp > 0xFF else f"\\x{cp:02X}"
    return chr(cp)


@st.composite
def _literal(draw: st.DrawFn) -> str:
    cps = draw(st.lists(CODE_POINTS, max_size=3))
    raw = draw(st.booleans())  # raw characters (lone surrogates included) or escapes
    body = "".join(chr(c) if raw and 0x20 <= c <= 0x10FFFF and chr(c) not in '"\\' else _escape(c)
                   for c in cps)
    return f'"{body}"'


@st.composite
def _char_class(draw: st.DrawFn) -> str:
    parts = []
    for lo, hi in draw(st.lists(st.tuples(CODE_POINTS, CODE_POINTS), min_size=0, max_size=3)):
        parts.append(_escape(lo) + ("-" + _escape(hi) if draw(st.booleans()) else ""))
    return "[" + ("^" if draw(st.booleans()) else "") + "".join(parts) + "]"


def _atoms(depth: int) -> st.SearchStrategy[str]:
    simple = st.one_of(
        _literal(), _char_class(), st.just("."),
        st.integers(0, 40000).map(lambda t: f"<[{t}]>"),
        st.integers(0, 40000).map(lambda t: f"!<[{t}]>"),
        st.sampled_from(RULES + ["root", "root", "undefined"]))
    if depth <= 0:
        return simple
    return st.one_of(simple, _alternatives(depth - 1).map(lambda a: f"({a})"))


def _suffix() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["", "", "", "*", "+", "?"]),
        st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda t: f"{{{t[0]},{t[0] + t[1]}}}"),
        st.integers(0, 3).map(lambda n: f"{{{n},}}"))


def _alternatives(depth: int) -> st.SearchStrategy[str]:
    # An empty sequence is written "" (a bare one at the end of a line would
    # join the next line to this rule, as in llama.cpp).
    sequence = st.lists(st.tuples(_atoms(depth), _suffix()).map("".join), max_size=4).map(
        lambda items: " ".join(items) or '""')
    return st.lists(sequence, min_size=1, max_size=3).map(" | ".join)


@st.composite
def grammars(draw: st.DrawFn) -> str:
    names = ["root"] + draw(st.lists(st.sampled_from(RULES[1:]), unique=True, max_size=3))
    if draw(st.booleans()):
        names = ["root"] + RULES[1:]  # every rule a reference may name is defined
    return "\n".join(f"{name} ::= {draw(_alternatives(2))}" for name in names)


# The shapes that once aborted, hung or replied with replacement characters.
ADVERSARIAL = [
    "root ::= [b-a]", "root ::= []", 'root ::= "\\U00110000"', "root ::= <[999999]>",
    "root ::= <[2]> \"a\"", 'root ::= x\nx ::= x? "a"', 'root ::= opt root "a" | "b"\nopt ::= "c"?',
    'root ::= "a" root', 'root ::= "a" [^\\x00-\\U0010FFFF]', "root ::= " + "(" * 300 + '"a"' + ")" * 300,
    'root ::= "\\x00"', 'root ::= "a"\x00"b"', 'root ::= "\ud800"',
]


@FUZZ
@given(grammars())
def test_fuzz_validate_grammar_only_raises_grammar_error(grammar: str) -> None:
    _count("grammar (validator)", "tried")
    try:
        validate_grammar(grammar, n_vocab=32000)
    except GrammarError:
        _count("grammar (validator)", "typed_errors")


def _grammar_run(child: Child, grammar: str) -> None:
    child.request("grammar (engine)", {"prompt": "Hello", "config": {
        "temperature": 0.0, "max_tokens": 6, "grammar": grammar}})


@pytest.mark.parametrize("grammar", ADVERSARIAL)
def test_adversarial_grammars_in_the_engine(child: Child, grammar: str) -> None:
    _grammar_run(child, grammar)


@FUZZ
@given(grammars())
def test_fuzz_grammars_in_the_engine(child: Child, grammar: str) -> None:
    _grammar_run(child, grammar)


# ---------------------------------------------------------------------------
# Sampling parameters
# ---------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-3, 300), st.integers(-(2**70), 2**70), st.sampled_from([2**31 - 1, 2**31, -(2**31)]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-5, 5), st.sampled_from([1e39, 1e-50]),
    st.booleans(), st.none(), st.text(max_size=3))
PARAMS = ["max_tokens", "temperature", "top_p", "min_p", "top_k", "repetition_penalty",
          "repetition_penalty_window", "frequency_penalty", "presence_penalty", "seed", "logprobs"]


@FUZZ
@given(st.dictionaries(st.sampled_from(PARAMS), NUMBERS, max_size=5),
       st.lists(st.text(max_size=4), max_size=3))
@example({"repetition_penalty_window": -1, "repetition_penalty": 2.0}, [])
@example({"repetition_penalty_window": 2**31 - 1, "repetition_penalty": 1.5}, [])
@example({"max_tokens": 2**31}, [])
@example({"top_k": 2**31, "temperature": 1.0}, [])
def test_fuzz_sampling_parameters(child: Child, params: dict[str, Any], stops: list[str]) -> None:
    config = {"max_tokens": 6, **params, "stop_sequences": stops}
    if isinstance(config["max_tokens"], int) and not isinstance(config["max_tokens"], bool):
        config["max_tokens"] = min(config["max_tokens"], 24)  # keep each run short
    child.request("sampling parameters", {"prompt": "Once upon a time", "config": config})


# ---------------------------------------------------------------------------
# Prompts and token lists
# ---------------------------------------------------------------------------

PROMPT_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=40),
    st.lists(st.sampled_from(["\x00", "\ud800", "\udfff", "<|im_start|>", "<s>", "</s>", "\n", "é"]),
             max_size=30).map("".join),
    st.integers(1, 4).map(lambda k: "word " * (10**k)))


@FUZZ
@given(PROMPT_TEXT, st.booleans())
@example("a\ud800b", False)
@example("\x00" * 10, True)
@example("lorem " * 100_000, True)
def test_fuzz_prompts(child: Child, prompt: str, chat: bool) -> None:
    child.request("prompts", {"prompt": prompt, "chat": chat,
                              "config": {"temperature": 0.0, "max_tokens": 4}})


@FUZZ
@given(st.lists(st.one_of(st.integers(-5, 32010), st.integers(-(2**40), 2**40),
                          st.booleans(), st.floats(), st.none()), max_size=300))
@example([])
@example([2**31])
@example([31999, 32000])
def test_fuzz_token_lists(child: Child, tokens: list[Any]) -> None:
    child.request("token lists", {"prompt": tokens, "config": {"temperature": 0.0, "max_tokens": 4}})


# ---------------------------------------------------------------------------
# Tool-call text, chunk by chunk (pure Python: in this process)
# ---------------------------------------------------------------------------

FRAGMENTS = ["<tool_call>", "</tool_call>", "{", "}", "[", "]", '"name"', ":", '"f"', ",",
             '"arguments"', '"x"', "1", "<function=f>", "<parameter=x>", "</parameter>",
             "</function>", "[f(", "x=1", ")]", "<start_function_call>", "call:f{",
             "<end_function_call>", "<think>", "</think>", "\\", '"', " ", "\n", "\ud800"]


@st.composite
def tool_text(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40))
    if draw(st.booleans()):  # deep nesting
        depth = draw(st.integers(100, 5000))
        parts.insert(draw(st.integers(0, len(parts))), "[" * depth + "]" * depth)
    return "".join(parts)


@FUZZ
@given(tool_text(), st.lists(st.integers(1, 30), min_size=1, max_size=20),
       st.sampled_from(["auto", "hermes"]))
@example('<tool_call>{"name": "f", "arguments": ' + "[" * 20000 + "]" * 20000 + "}</tool_call>",
         [7], "auto")
def test_fuzz_tool_call_text_chunk_by_chunk(text: str, cuts: list[int], fmt: str) -> None:
    _count("tool-call text", "tried")
    try:
        whole = parse_tool_calls(text, fmt, tool_names=["f"])
    except XybridError:
        _count("tool-call text", "typed_errors")
        whole = None
    parser = ToolCallParser(fmt, tool_names=["f"])
    pos, i = 0, 0
    try:
        while pos < len(text):
            step = cuts[i % len(cuts)]
            parser.feed(text[pos:pos + step])
            pos += step
            i += 1
        parser.finish()
    except XybridError:
        assert whole is None, "streaming refused what the whole text parsed"
        return
    except Exception as exc:  # pragma: no cover - a finding
        _count("tool-call text", "untyped_errors")
        raise AssertionError(f"untyped {type(exc).__name__} while streaming {text!r:.300}") from exc


# ---------------------------------------------------------------------------
# Media: image and audio bytes, arrays, paths and content parts
# ---------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A small, well-formed PNG (valid CRCs) whose header declares any size:
    the decompression bomb (the pixel data is a few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = idat or zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) \
        + _png_chunk(b"IEND", b"")


def _wav(rate: int = 16000, n: int = 800, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(bytes((i * 37) & 0xFF for i in range(n * channels * width)))
    return buf.getvalue()


@functools.cache
def _image_samples() -> tuple[bytes, ...]:
    """Real encoded images (Pillow writes them): PNG, JPEG, GIF, BMP, WebP
    where this Pillow has it, TIFF."""
    from PIL import Image as PILImage

    pixels = PILImage.frombytes("RGB", (12, 9), bytes((i * 7) & 0xFF for i in range(12 * 9 * 3)))
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        try:
            pixels.save(buf, fmt)
        except (KeyError, OSError):  # pragma: no cover - a Pillow built without it
            continue
        out.append(buf.getvalue())
    return tuple(out)


@functools.cache
def _audio_samples() -> tuple[bytes, ...]:
    """Real encoded audio: WAV (written here) and the mp3 llama.cpp ships."""
    mp3 = Path(__file__).resolve().parents[1] / "llama.cpp" / "tools" / "mtmd" / "test-2.mp3"
    return (_wav(), _wav(8000, 300, 2), _wav(44100, 500, 1, 1)) + \
        ((mp3.read_bytes()[:6000],) if mp3.is_file() else ())


@st.composite
def _mutated(draw: st.DrawFn, samples: tuple[bytes, ...]) -> bytes:
    """A real file with byte-level mutations: flips, overwrites, insertions,
    deletions, a truncation."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)


SIDES = st.one_of(st.integers(0, 64), st.integers(16000, 17000),
                  st.sampled_from([1, 100_000, 2**24, 2**31 - 1, 2**32 - 1]))


@st.composite
def _declared_size_png(draw: st.DrawFn) -> bytes:
    return _png_declaring(draw(SIDES), draw(SIDES))


@st.composite
def _declared_wav(draw: st.DrawFn) -> bytes:
    """A WAV whose header fields lie: sample rate, channels, bits, data size."""
    data = bytearray(_wav())
    struct.pack_into("<I", data, 24, draw(st.sampled_from([0, 1, 999, 8000, 384_001, 2**31, 2**32 - 1])))
    if draw(st.booleans()):
        struct.pack_into("<H", data, 22, draw(st.sampled_from([0, 2, 255, 65535])))
    if draw(st.booleans()):
        struct.pack_into("<H", data, 34, draw(st.sampled_from([0, 1, 7, 24, 32, 64, 65535])))
    if draw(st.booleans()):
        struct.pack_into("<I", data, 40, draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
    return bytes(data)


@st.composite
def _declared_flac(draw: st.DrawFn) -> bytes:
    rate = draw(st.sampled_from([0, 1, 16000, 655_350, 2**20 - 1]))
    total = draw(st.sampled_from([0, 1, 16000, 2**36 - 1]))
    info = (rate << 44) | (0 << 41) | (15 << 36) | total
    streaminfo = struct.pack(">HH", 16, 16) + b"\x00" * 6 + info.to_bytes(8, "big") + b"\x00" * 16
    return b"fLaC" + bytes([0x80, 0, 0, 34]) + streaminfo + draw(st.binary(max_size=64))


DTYPES = ["uint8", "float32", "float64", "int16", "int64", "bool", "complex64", "float16"]
VALUES = st.one_of(st.integers(0, 255), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([float("nan"), float("inf"), -1.0, 1e38, 1e-45]))


@st.composite
def _array_spec(draw: st.DrawFn, audio: bool) -> dict[str, Any]:
    """An array of any shape and dtype: small ones from real bytes, any shape
    as one value broadcast (a 100k x 100k x 3 view costs nothing)."""
    dtype = draw(st.sampled_from(["float32"] * 4 + DTYPES if audio else ["uint8"] * 4 + DTYPES))
    if draw(st.booleans()):
        if audio:
            shape = [draw(st.one_of(st.integers(0, 40000), st.sampled_from([1, 2, 3, 16000])))]
        else:
            shape = [draw(st.integers(0, 24)), draw(st.integers(0, 24)), 3]
        if draw(st.integers(0, 4)) == 0:
            shape = draw(st.lists(st.integers(0, 6), max_size=4))
        n = int(np.prod(shape)) if shape else 1
        values = draw(st.lists(VALUES, min_size=1, max_size=4))
        arr = np.resize(np.array(values).astype(dtype), n).reshape(shape)
        return {"dtype": dtype, "shape": shape, "data": _b64(arr.tobytes())}
    shape = draw(st.lists(SIDES, min_size=0, max_size=4))
    if draw(st.booleans()):
        shape = ([draw(SIDES)] if audio else [draw(SIDES), draw(SIDES), 3])
    while math.prod(max(d, 1) for d in shape) * 16 >= 2**63:  # numpy cannot describe it
        shape = shape[:-1]
    return {"dtype": dtype, "shape": shape, "fill": draw(VALUES)}


PATHS = st.one_of(
    st.sampled_from(["/nonexistent/a.png", "/dev/null", "/dev/zero", "/proc/self/mem", "/", "clip.mp4",
                     "/tmp/" + "a" * 5000, "a\x00b.png", "\ud800.png", "", "file://", ".."]),
    st.text(max_size=20))


@st.composite
def _content_part(draw: st.DrawFn) -> dict[str, Any]:
    """OpenAI-style content parts: data URLs of any payload, paths, remote
    URLs, audio with any base64, malformed parts."""
    payload = draw(st.one_of(st.sampled_from(_image_samples()), _mutated(_image_samples()),
                             _declared_size_png(), st.binary(max_size=64)))
    encoded = _b64(payload)
    if draw(st.integers(0, 4)) == 0:
        encoded = draw(st.sampled_from([encoded[:-1], encoded + "!", "", "====", encoded.replace("A", "\n")]))
    kind = draw(st.sampled_from(["image_url", "image_url", "input_audio", "video_url", "file", None, 7]))
    if kind == "image_url":
        url = draw(st.one_of(
            st.just(f"data:image/png;base64,{encoded}"), st.just(f"data:image/png,{encoded}"),
            st.just(f"data:;base64,{encoded}"), PATHS, st.just("https://example.invalid/a.png")))
        return {"type": kind, "image_url": draw(st.sampled_from([{"url": url}, url, {"url": None}, {}]))}
    if kind == "input_audio":
        audio = _b64(draw(st.one_of(st.sampled_from(_audio_samples()), _mutated(_audio_samples()))))
        spec = draw(st.sampled_from([{"data": audio, "format": "wav"}, {"data": encoded, "format": "mp3"},
                                     {"data": 5}, {}, "x"]))
        return {"type": kind, "input_audio": spec}
    return {"type": kind}


def _media_items() -> st.SearchStrategy[dict[str, Any]]:
    images = _image_samples()
    sounds = _audio_samples()
    return st.one_of(
        st.binary(max_size=300).map(lambda b: {"image": _b64(b)}),
        st.binary(max_size=300).map(lambda b: {"audio": _b64(b)}),
        _mutated(images).map(lambda b: {"image": _b64(b)}),
        _mutated(sounds).map(lambda b: {"audio": _b64(b)}),
        _declared_size_png().map(lambda b: {"image": _b64(b)}),
        _declared_size_png().map(lambda b: {"audio": _b64(b)}),  # an image where audio goes
        _declared_wav().map(lambda b: {"audio": _b64(b)}),
        _declared_flac().map(lambda b: {"audio": _b64(b)}),
        _array_spec(audio=False).map(lambda a: {"image_array": a}),
        _array_spec(audio=True).map(lambda a: {"audio_array": a}),
        st.binary(max_size=400).map(lambda b: {"pcm": _b64(b)}),
        PATHS.map(lambda p: {"image_path": p}),
        PATHS.map(lambda p: {"audio_path": p}),
        _content_part().map(lambda p: {"part": p}),
    )


@pytest.fixture(scope="module")
def media_child(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    from xybrid.testing.tiny_models import write_tiny_vlm

    model, mmproj = write_tiny_vlm(tmp_path_factory.mktemp("fuzz_omni"), vision=True, audio=True)
    c = Child(tiny_llama_path, model, mmproj)
    yield c
    c.stop()


def _media_run(child: Child, items: list[dict[str, Any]]) -> None:
    child.request("media", {"media": items, "config": {"temperature": 0.0, "max_tokens": 2}})


@FUZZ
@given(st.lists(_media_items(), min_size=1, max_size=3))
# The decompression bomb: 100k x 100k declared by a few hundred bytes.
@example([{"image": _b64(_png_declaring(100_000, 100_000))}])
# PNG bytes given as audio: mtmd would have decoded them as an image.
@example([{"audio": _b64(_png_declaring(4000, 4000))}])
@example([{"audio": _b64(b"\xff" * 100_000)}])
@example([{"image_array": {"dtype": "uint8", "shape": [100_000, 100_000, 3], "fill": 0}}])
@example([{"audio_array": {"dtype": "float32", "shape": [2**31], "fill": 0.0}}])
@example([{"audio_array": {"dtype": "float32", "shape": [3], "fill": 1e38}}])
@example([{"pcm": _b64(struct.pack("<f", float("nan")))}])
# One sample (raw, or a WAV of one frame): GGML_ASSERT in mtmd, the process aborted.
@example([{"pcm": _b64(b"\x00" * 4)}])
@example([{"audio": _b64(_wav(16000, 1))}])
@example([{"audio_array": {"dtype": "float32", "shape": [1], "fill": 0.0}}])
@example([{"audio_path": "/dev/zero"}, {"image_path": "\ud800.png"}])
def test_fuzz_media(media_child: Child, items: list[dict[str, Any]]) -> None:
    _media_run(media_child, items)


# ---------------------------------------------------------------------------
# Chat templates (pure Python: in this process, each render timed)
# ---------------------------------------------------------------------------

# A render that takes this much CPU time is a hang: the step bound stops a
# runaway template within a few seconds. CPU time, not wall time, so that a
# loaded machine does not make a false hang.
TEMPLATE_DEADLINE_S = 15.0

NUMBERS_T = st.sampled_from(["0", "1", "-1", "3", "40", "100000", "999999999", "10**9", "2**31",
                             "1.5", "1e308", "-0.0"])
STRINGS_T = st.sampled_from(["''", "'a'", "'ab'", "'%999999999d'", "'{:999999999}'", "'%s'",
                             "'{}{}'", "'\\t'", "'\\n'", "'x' * 1000", "'<|im_start|>'", "'%*d'",
                             "'%(a)s'", "'{0:{1}}'"])
NAMES_T = st.sampled_from(["messages", "messages[0]", "messages[0].content", "messages[-1]['role']",
                           "m", "m.content", "loop.index", "loop", "ns", "ns.x", "x", "bos_token",
                           "tools", "add_generation_prompt", "nothing", "messages|length",
                           "range(5)", "range(100000)", "namespace", "cycler", "lipsum",
                           "raise_exception", "strftime_now", "dict(a=1)"])
BINOPS = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "<", "and", "or", "in", "not in"]
FILTERS = ["upper", "length", "list", "first", "last", "join", "join(', ')", "join(x)",
           "center(999999999)", "center(40)", "indent(999999999)", "indent(x)", "wordwrap(1)",
           "format(x)", "format(999999999)", "replace('a', x)", "replace('', x)", "batch(999999999, 0)",
           "slice(999999999)", "tojson", "tojson(indent=999999999)", "string", "reverse", "sort",
           "unique", "sum", "sum(start=[])", "map('string')", "map('center', 999999999)",
           "select", "reject('none')", "items", "dictsort", "default('d')", "int", "float", "trim",
           "truncate(3)", "urlize", "pprint", "e", "title", "wordcount", "round(2)", "abs",
           "attr('content')", "selectattr('role', 'equalto', 'user')", "groupby('role')", "random"]
METHODS = ["upper()", "strip()", "split()", "splitlines()", "ljust(999999999)", "zfill(999999999)",
           "center(x)", "replace('a', x)", "replace('', x)", "join(x)", "format(x, 999999999)",
           "format_map(x)", "startswith('a')", "items()", "keys()", "get('a')", "expandtabs(999999999)",
           "translate({97: x})", "count('')", "title()", "append(1)", "__class__"]


def _expr(depth: int) -> st.SearchStrategy[str]:
    atom = st.one_of(NUMBERS_T, STRINGS_T, NAMES_T,
                     st.text(st.characters(codec="utf-8"), max_size=3).map(repr))
    if depth <= 0:
        return atom
    sub = _expr(depth - 1)
    return st.one_of(
        atom,
        st.tuples(sub, st.sampled_from(BINOPS), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(FILTERS)).map(lambda t: f"({t[0]})|{t[1]}"),
        st.tuples(sub, st.sampled_from(METHODS)).map(lambda t: f"({t[0]}).{t[1]}"),
        st.tuples(sub, sub).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(sub, sub, sub).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.lists(sub, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        sub.map(lambda e: f"{{'a': {e}}}"),
        sub.map(lambda e: f"f({e})"),
    )


def _block(depth: int) -> st.SearchStrategy[str]:
    expr = _expr(2)
    simple = st.one_of(
        st.sampled_from(["text ", "<|im_start|>", "\n", "{{ bos_token }}", "{% break %}",
                         "{% continue %}", "{{ raise_exception('no') }}", "{{ caller() }}"]),
        expr.map(lambda e: f"{{{{ {e} }}}}"),
        expr.map(lambda e: f"{{% set x = {e} %}}"),
        expr.map(lambda e: f"{{% set ns.x = {e} %}}"),
        expr.map(lambda e: f"{{% set ns = namespace(x={e}) %}}"),
    )
    if depth <= 0:
        return simple
    body = st.lists(_block(depth - 1), max_size=3).map("".join)
    return st.one_of(
        simple,
        st.tuples(expr, body).map(lambda t: f"{{% for x in {t[0]} %}}{t[1]}{{% endfor %}}"),
        body.map(lambda b: f"{{% for m in messages %}}{b}{{% endfor %}}"),
        body.map(lambda b: f"{{% for i in range(100000) %}}{b}{{% endfor %}}"),
        body.map(lambda b: f"{{% for x in [1, 2] recursive %}}{b}{{{{ loop([x]) }}}}{{% endfor %}}"),
        st.tuples(expr, body, body).map(
            lambda t: f"{{% if {t[0]} %}}{t[1]}{{% else %}}{t[2]}{{% endif %}}"),
        body.map(lambda b: f"{{% macro f(a, b=1) %}}{b}{{{{ f(a ~ a) }}}}{{% endmacro %}}"),
        body.map(lambda b: f"{{% macro f(a) %}}{b}{{% endmacro %}}"),
        body.map(lambda b: f"{{% call f(1) %}}{b}{{% endcall %}}"),
        body.map(lambda b: f"{{% filter upper %}}{b}{{% endfilter %}}"),
        body.map(lambda b: f"{{% generation %}}{b}{{% endgeneration %}}"),
    )


@st.composite
def chat_templates(draw: st.DrawFn) -> str:
    parts = draw(st.lists(_block(2), min_size=1, max_size=5))
    if draw(st.booleans()):  # most real templates start by defining these
        parts.insert(0, "{% set ns = namespace(x=0) %}{% macro f(a) %}{{ a }}{% endmacro %}")
    return "".join(parts)


TEMPLATE_MESSAGES = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]),
              st.one_of(st.text(max_size=20), st.just("x" * 10000))),
    min_size=1, max_size=4)


@FUZZ
@given(chat_templates(), TEMPLATE_MESSAGES, st.booleans())
@example("{{ '%999999999d' % 1 }}", [("user", "hi")], False)
@example("{{ 'a'|center(999999999) }}", [("user", "hi")], False)
@example("{% set s = 'x' * 8000000 %}{% set l = [s] * 8000000 %}{{ l }}", [("user", "hi")], False)
@example("{{ range(100000)|join('x' * 8000000) }}", [("user", "hi")], False)
@example("{{ range(3)|batch(10**9, 0)|list|length }}", [("user", "hi")], False)
@example("{{ ('a' * 1000000)|wordwrap(1) }}", [("user", "hi")], False)
@example("{{ lipsum(100000) }}", [("user", "hi")], False)
# Measuring values spends from the step budget (this ran 10 s on a loaded machine).
@example("{% set ns = namespace(x=0) %}{% macro f(a) %}{{ a }}{% endmacro %}{% for i in range(100000) %}"
         "{{ {'a': messages} }}{% set x = f([]) %}{% endfor %}", [("system", "")], False)
def test_fuzz_chat_templates(template: str, messages: list[tuple[str, str]], with_tools: bool) -> None:
    import time

    from xybrid.chat_templates import JinjaChatTemplate
    from xybrid.types import ChatMessage

    suite = "chat templates (Jinja)"
    _count(suite, "tried")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}] \
        if with_tools else None
    start = time.process_time()
    try:
        JinjaChatTemplate(template, bos_token="<s>").render(
            [ChatMessage(role, text) for role, text in messages], tools=tools)
    except XybridError:
        _count(suite, "typed_errors")
    except Exception as exc:  # pragma: no cover - a finding
        _count(suite, "untyped_errors")
        raise AssertionError(f"untyped {type(exc).__name__}: {exc} on {template!r:.300}") from exc
    elapsed = time.process_time() - start
    if elapsed > TEMPLATE_DEADLINE_S:  # pragma: no cover - a finding
        _count(suite, "hangs")
        raise AssertionError(f"hang: {elapsed:.1f} s rendering {template!r:.300}")
