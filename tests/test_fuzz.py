"""Fuzz suites (Hypothesis) over the public API, with the real extension.

Each suite draws hostile inputs of one kind: GBNF grammars (random and built
from the shapes that once killed the process), sampling parameters, prompts
(any Unicode, NUL, lone surrogates), token lists and tool-call text fed chunk
by chunk. The properties, for every input:

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

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """tests/fuzz_child.py (or another child script beside it), restarted
    after it dies."""

    def __init__(self, model: Path, script: str = "fuzz_child.py") -> None:
        self.model = model
        self.script = script
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        script = Path(__file__).with_name(self.script)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.model)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
            err = self.proc.stderr.read() if self.proc.stderr else ""
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
