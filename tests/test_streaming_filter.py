"""Tests of xybrid.streaming: the streaming filter and the final-text cleanup."""

from __future__ import annotations

import random

import pytest

from xybrid.errors import InvalidInputError, XybridError
from xybrid.streaming import (
    CHAT_STOP_PATTERNS,
    CHAT_STOP_PATTERNS_BROKEN,
    THINK_TAGS,
    StreamingTextFilter,
    merge_stop_patterns,
    strip_thinking_tags,
    trim_partial_stop_suffix,
    truncate_at_first_stop,
)

IM_END = ("<|im_end|>",)


def feed(flt: StreamingTextFilter, chunks: list[str]) -> list[str]:
    """Push every chunk, then finish; return the non-None pieces in order."""
    pieces = [piece for piece in (flt.push(c) for c in chunks) if piece is not None]
    tail = flt.finish()
    if tail is not None:
        pieces.append(tail)
    return pieces


def one_shot(text: str, patterns: tuple[str, ...], strip_thinking: bool = True) -> str:
    return "".join(feed(StreamingTextFilter(patterns, strip_thinking), [text]))


# ---------------------------------------------------------------------------
# Table of streaming cases: patterns, chunks, expected text, stopped, thinking
# ---------------------------------------------------------------------------

CASES = [
    pytest.param(IM_END, ["Hello<|im_", "end|>more"], "Hello", True, "", id="stop-split-2"),
    pytest.param(IM_END, ["Hi <|", "im_e", "nd|> x"], "Hi ", True, "", id="stop-split-3"),
    pytest.param(IM_END, list("Hello<|im_end|>tail"), "Hello", True, "", id="stop-1-char-chunks"),
    pytest.param(("STOP", "END"), ["a END b ", "STOP c"], "a ", True, "", id="later-listed-earlier"),
    pytest.param(("STOP", "END"), list("a END b STOP c"), "a ", True, "", id="later-listed-1-char"),
    pytest.param(("STOPPING", "STOP"), ["go STOPPI", "NG now"], "go ", True, "", id="prefix-pattern"),
    pytest.param(("STOP", "STOPPING"), ["go STOP", "PED"], "go ", True, "", id="prefix-pattern-short"),
    # "abcd" starts before "bc": the filter must wait for the 'd' before it
    # may act on the complete "bc".
    pytest.param(("abcd", "bc"), ["xabc", "d!"], "x", True, "", id="overlap-longer-earlier"),
    pytest.param(("abcd", "bc"), ["xabc", "e!"], "xa", True, "", id="overlap-fallback"),
    pytest.param(IM_END, ["Hello <|im", "_fine"], "Hello <|im_fine", False, "", id="partial-not-stop"),
    pytest.param(IM_END, ["ok <|im_"], "ok <|im_", False, "", id="partial-at-end-is-text"),
    pytest.param(IM_END, ["<|im_end|>rest"], "", True, "", id="stop-at-start"),
    pytest.param(IM_END, ["<|im_", "end|>"], "", True, "", id="stop-at-start-split"),
    pytest.param((), ["<think>ab", "cd</think>Answer"], "Answer", False, "abcd", id="think-block-split"),
    pytest.param((), ["<th", "ink>x</thi", "nk>y"], "y", False, "x", id="think-tags-split"),
    pytest.param((), list("<think>x</think>y"), "y", False, "x", id="think-1-char-chunks"),
    pytest.param((), ["Hi <think>still", " going"], "Hi ", False, "still going", id="unclosed-think"),
    pytest.param((), ["a<thinking>r</thinking>b"], "ab", False, "r", id="thinking-tag"),
    pytest.param((), ["<think>a</thinking>b</think>c"], "c", False, "a</thinking>b", id="close-must-match"),
    pytest.param((), ["1<think>a</think>2<think>b</think>3"], "123", False, "ab", id="two-think-blocks"),
    pytest.param((), ["x <thin", "g>"], "x <thing>", False, "", id="near-think-tag"),
    pytest.param(IM_END, ["héllo 😀<|im", "_end|>"], "héllo 😀", True, "", id="emoji-before-stop"),
    pytest.param(("<end_of_turn>",), ["你好<end_of", "_turn>世界"], "你好", True, "", id="cjk-around-stop"),
    pytest.param((), ["<think>思", "考🤔</think>答"], "答", False, "思考🤔", id="non-ascii-think"),
    pytest.param(("。",), ["你好", "。再见"], "你好", True, "", id="cjk-pattern"),
    pytest.param(CHAT_STOP_PATTERNS, ["done<｜end▁of", "▁sentence｜>x"], "done", True, "", id="deepseek-marker"),
    pytest.param(("<|eot_id|>",), ["", "Hi", "", "<|eot", "", "_id|>", ""], "Hi", True, "", id="empty-chunks"),
    pytest.param(IM_END, [""], "", False, "", id="only-empty"),
    pytest.param(IM_END, ["<think>plan<|im_end|>", "after"], "", True, "plan", id="stop-inside-think"),
    pytest.param(IM_END, ["<think>p</think>ans<|im_", "end|>"], "ans", True, "p", id="stop-after-think"),
    pytest.param(("<th",), ["a<think>b"], "a", True, "", id="stop-wins-tie-with-tag"),
    pytest.param(CHAT_STOP_PATTERNS, ["Sure.\n[INST] next"], "Sure.\n", True, "", id="inst-marker"),
]


@pytest.mark.parametrize(("patterns", "chunks", "expected", "stopped", "thinking"), CASES)
def test_filter_cases(
    patterns: tuple[str, ...], chunks: list[str], expected: str, stopped: bool, thinking: str
) -> None:
    flt = StreamingTextFilter(patterns)
    pieces = feed(flt, chunks)
    assert "".join(pieces) == expected
    assert flt.cumulative_emitted == expected
    assert flt.is_stopped is stopped
    assert flt.thinking == thinking
    assert all(pieces), "push/finish must return None rather than an empty string"


@pytest.mark.parametrize(("patterns", "chunks", "expected", "stopped", "thinking"), CASES)
def test_filter_cases_match_one_shot(
    patterns: tuple[str, ...], chunks: list[str], expected: str, stopped: bool, thinking: str
) -> None:
    assert one_shot("".join(chunks), patterns) == expected


# ---------------------------------------------------------------------------
# Hold-back is minimal, and finished state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "released"),
    [
        ("Hello <|im", "Hello "),  # holds only "<|im"
        ("Hello <", "Hello "),  # "<" may start the marker or a think tag
        ("a<b", "a<b"),  # "<b" starts nothing
        ("plain text", "plain text"),
        ("x</thi", "x</thi"),  # a closing tag outside a block is plain text
        ("x<thin", "x"),  # may still become "<think>" or "<thinking>"
        ("x<think", "x"),
    ],
)
def test_holds_back_only_a_possible_marker(chunk: str, released: str) -> None:
    assert StreamingTextFilter(IM_END).push(chunk) == released


def test_pushes_after_stop_return_none() -> None:
    flt = StreamingTextFilter(IM_END)
    assert flt.push("ok<|im_end|>") == "ok"
    assert flt.matched_stop == "<|im_end|>"
    assert flt.push("more text") is None
    assert flt.finish() is None
    assert flt.cumulative_emitted == "ok"


def test_push_after_finish_is_an_error() -> None:
    flt = StreamingTextFilter(IM_END)
    assert flt.push("a") == "a"
    assert flt.finish() is None
    assert flt.finish() is None
    with pytest.raises(XybridError):
        flt.push("b")


def test_push_rejects_non_str() -> None:
    with pytest.raises(InvalidInputError):
        StreamingTextFilter(IM_END).push(b"bytes")  # type: ignore[arg-type]


def test_cumulative_is_concatenation_of_pieces() -> None:
    flt = StreamingTextFilter(CHAT_STOP_PATTERNS)
    seen: list[str] = []
    for chunk in ["Once ", "<thi", "nk>hm</think>", "upon a <", "b>time", " <|e", "ot_id|>!"]:
        piece = flt.push(chunk)
        if piece is not None:
            seen.append(piece)
        assert flt.cumulative_emitted == "".join(seen)
    assert flt.cumulative_emitted == "Once upon a <b>time "
    assert flt.in_think is False


def test_strip_thinking_disabled_passes_tags_through() -> None:
    flt = StreamingTextFilter(IM_END, strip_thinking=False)
    assert "".join(feed(flt, ["<think>x</th", "ink>y<|im_end|>"])) == "<think>x</think>y"
    assert flt.thinking == ""


def test_starts_in_think_hides_until_first_close() -> None:
    flt = StreamingTextFilter(IM_END, starts_in_think=True)
    assert flt.in_think
    assert "".join(feed(flt, ["reason", "ing</thi", "nk>answer"])) == "answer"
    assert flt.thinking == "reasoning"


def test_starts_in_think_requires_stripping() -> None:
    with pytest.raises(InvalidInputError):
        StreamingTextFilter(IM_END, strip_thinking=False, starts_in_think=True)


def test_empty_patterns_are_ignored() -> None:
    flt = StreamingTextFilter(["", "<|im_end|>", "<|im_end|>"])
    assert flt.stop_patterns == ("<|im_end|>",)
    assert "".join(feed(flt, ["a<|im_end|>"])) == "a"


# ---------------------------------------------------------------------------
# Property: the output does not depend on the chunking
# ---------------------------------------------------------------------------

PROPERTY_TEXTS = [
    "Hello there!<|im_end|>ignored",
    "<think>Let me see… 2+2</think>\n\nIt is 4.<end_of_turn>\n<start_of_turn>user",
    "no stop at all, but a lone < and <|im and </s",
    "x abcd bc y <thinking>deep</thinking> z",
    "中文😀<think>想</think>回答<|eot_id|>",
    "<think>unclosed reasoning <|im_st",
    "STOPPING soon STOP",
]
PROPERTY_PATTERNS = CHAT_STOP_PATTERNS + ("abcd", "bc", "STOP", "STOPPING")


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, min(8, len(text) - 1))))
    bounds = [0, *cuts, len(text)]
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    # Sprinkle empty chunks: they must change nothing.
    for _ in range(rng.randint(0, 2)):
        chunks.insert(rng.randint(0, len(chunks)), "")
    return chunks


@pytest.mark.parametrize("text", PROPERTY_TEXTS)
def test_random_chunkings_match_one_shot(text: str) -> None:
    rng = random.Random(f"xybrid:{text}")
    expected_flt = StreamingTextFilter(PROPERTY_PATTERNS)
    expected = "".join(feed(expected_flt, [text]))
    for _ in range(200):
        chunks = random_chunks(text, rng)
        flt = StreamingTextFilter(PROPERTY_PATTERNS)
        pieces = feed(flt, chunks)
        assert "".join(pieces) == expected, chunks
        assert flt.cumulative_emitted == expected
        assert flt.thinking == expected_flt.thinking
        assert flt.is_stopped == expected_flt.is_stopped


@pytest.mark.parametrize("text", PROPERTY_TEXTS)
def test_stream_agrees_with_final_cleanup(text: str) -> None:
    truncated, stopped = truncate_at_first_stop(text, PROPERTY_PATTERNS)
    flt = StreamingTextFilter(PROPERTY_PATTERNS)
    assert "".join(feed(flt, [text])) == strip_thinking_tags(truncated)
    assert flt.is_stopped is stopped


# ---------------------------------------------------------------------------
# Pattern lists and final-text helpers
# ---------------------------------------------------------------------------


def test_pattern_lists_are_sane() -> None:
    for patterns in (CHAT_STOP_PATTERNS, CHAT_STOP_PATTERNS_BROKEN):
        assert len(set(patterns)) == len(patterns)
        assert all(patterns)
    assert "<|im_end|>" in CHAT_STOP_PATTERNS
    assert "<end_of_turn>" in CHAT_STOP_PATTERNS
    # Every broken variant is a real marker with its leading "<" lost.
    assert all("<" + p in CHAT_STOP_PATTERNS for p in CHAT_STOP_PATTERNS_BROKEN)
    assert not set(CHAT_STOP_PATTERNS) & set(CHAT_STOP_PATTERNS_BROKEN)
    assert THINK_TAGS["<think>"] == "</think>"


@pytest.mark.parametrize(
    ("user", "extra", "expected"),
    [
        (["END"], ["<|im_end|>"], ("END", "<|im_end|>")),
        (["<|im_end|>", "END"], ["<|im_end|>", "x"], ("<|im_end|>", "END", "x")),
        (["", "A", ""], ["", "B", "A"], ("A", "B")),
        ([], [], ()),
        ((), CHAT_STOP_PATTERNS, CHAT_STOP_PATTERNS),
    ],
)
def test_merge_stop_patterns(user: list[str], extra: list[str], expected: tuple[str, ...]) -> None:
    assert merge_stop_patterns(user, extra) == expected


def test_merge_stop_patterns_rejects_non_str() -> None:
    with pytest.raises(InvalidInputError):
        merge_stop_patterns([1], [])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("text", "patterns", "expected"),
    [
        ("a STOP b END c", ["END", "STOP"], ("a ", True)),  # earliest position wins
        ("a STOP b END c", ["STOP", "END"], ("a ", True)),
        ("go STOPPING", ["STOPPING", "STOP"], ("go ", True)),
        ("<|im_end|>x", ["<|im_end|>"], ("", True)),
        ("nothing here", ["<|im_end|>"], ("nothing here", False)),
        ("empty pattern", ["", "x"], ("empty pattern", False)),
        ("", ["a"], ("", False)),
        ("你好。再见", ["。"], ("你好", True)),
        ("reply|im_end|>junk", CHAT_STOP_PATTERNS_BROKEN, ("reply", True)),
    ],
)
def test_truncate_at_first_stop(text: str, patterns: list[str], expected: tuple[str, bool]) -> None:
    assert truncate_at_first_stop(text, patterns) == expected


@pytest.mark.parametrize(
    ("text", "markup_only", "expected"),
    [
        ("hello <|im_", True, ("hello ", True)),
        ("hello <", True, ("hello ", True)),
        ("hello </", True, ("hello ", True)),
        ("hello [INS", True, ("hello ", True)),
        ("hello end_of", True, ("hello ", True)),  # "end_of" of "end_of_turn>"
        ("hello there", True, ("hello there", False)),  # "e" of "end_of_turn>" kept
        ("hello there", False, ("hello ther", True)),
        ("hello <|im_end|>", True, ("hello <|im_end|>", False)),  # complete: not a prefix
        ("", True, ("", False)),
    ],
)
def test_trim_partial_stop_suffix(text: str, markup_only: bool, expected: tuple[str, bool]) -> None:
    patterns = CHAT_STOP_PATTERNS + CHAT_STOP_PATTERNS_BROKEN
    assert trim_partial_stop_suffix(text, patterns, markup_only=markup_only) == expected


def test_trim_partial_uses_longest_fragment() -> None:
    assert trim_partial_stop_suffix("x <|", ["<|im_end|>", "|x"]) == ("x ", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>plan</think>\n\nAnswer", "\n\nAnswer"),
        ("a<think>b</think>c<think>d</think>e", "ace"),
        ("a<thinking>b</thinking>c", "ac"),
        ("answer <think>unclosed", "answer "),
        ("reasoning from prompt</think>Answer", "Answer"),
        ("reasoning</think>A<think>x</think>B", "AB"),
        ("<think>a</thinking>b</think>c", "c"),
        ("no tags at all", "no tags at all"),
        ("", ""),
        ("<think></think>", ""),
        ("思考</think>答案", "答案"),
    ],
)
def test_strip_thinking_tags(text: str, expected: str) -> None:
    assert strip_thinking_tags(text) == expected
