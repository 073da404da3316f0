"""Micro-benchmarks (pytest-benchmark) of the Python-facing hot spots that
the end-to-end harness does not isolate: tokenize / detokenize through the
engine, and the streaming text filter.

    .venv/bin/pytest bench/test_micro.py              # all
    .venv/bin/pytest bench/test_micro.py -k filter    # a subset

Not part of the test suite (`make test` runs tests/ only).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xybrid._native._engine import Model
from xybrid.streaming import CHAT_STOP_PATTERNS, StreamingTextFilter

from bench.harness import SHORT_PROMPT, long_text

REPO_ROOT = Path(__file__).resolve().parent.parent
VOCABS = {
    # The 32k SentencePiece vocabulary of the tiny benchmark model.
    "llama-spm": REPO_ROOT / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf",
}


def _gemma_path() -> Path | None:
    try:
        from xybrid.default_model import default_model_path

        return default_model_path()
    except Exception:  # pragma: no cover - no default model here
        return None


@pytest.fixture(scope="module", params=["llama-spm", "gemma3"])
def vocab(request: pytest.FixtureRequest) -> Model:
    path = VOCABS.get(request.param) or _gemma_path()
    if path is None or not Path(path).is_file():
        pytest.skip(f"vocabulary {request.param} not available")
    model = Model(str(path), vocab_only=True)
    yield model
    model.close()


LONG = long_text()


def test_tokenize_short(benchmark, vocab: Model) -> None:
    ids = benchmark(vocab.tokenize, SHORT_PROMPT)
    assert len(ids) > 10


def test_tokenize_long(benchmark, vocab: Model) -> None:
    ids = benchmark(vocab.tokenize, LONG)
    assert len(ids) > 1500


def test_detokenize_1500(benchmark, vocab: Model) -> None:
    ids = vocab.tokenize(LONG)[:1500]
    text = benchmark(vocab.detokenize, ids)
    assert text


def test_token_to_piece_256(benchmark, vocab: Model) -> None:
    ids = vocab.tokenize(LONG)[:256]
    pieces = benchmark(lambda: [vocab.token_to_piece(t) for t in ids])
    assert len(pieces) == 256


def _chunks(n: int) -> list[str]:
    words = (LONG + " ") * (1 + n // 200)
    parts = words.split(" ")[:n]
    return [p + " " for p in parts]


CHUNKS = _chunks(256)


def _run_filter(chunks: list[str], strip_thinking: bool) -> str:
    f = StreamingTextFilter(CHAT_STOP_PATTERNS, strip_thinking=strip_thinking)
    for c in chunks:
        f.push(c)
    f.finish()
    return f.cumulative_emitted


@pytest.mark.parametrize("strip_thinking", [False, True], ids=["stops", "stops+think"])
def test_filter_256_chunks(benchmark, strip_thinking: bool) -> None:
    """256 word-sized chunks through the chat stop patterns: the per-token
    cost a streaming chat reply pays in Python."""
    out = benchmark(_run_filter, CHUNKS, strip_thinking)
    assert out == "".join(CHUNKS)


def test_filter_one_big_chunk(benchmark) -> None:
    text = "".join(CHUNKS)
    out = benchmark(_run_filter, [text], True)
    assert out == text


def test_filter_held_back_markers(benchmark) -> None:
    """Chunks that keep ending in a prefix of a marker ("<", "<|im_"), the
    worst case for the hold-back logic."""
    words = LONG.split(" ")[:256]
    chunks = [f"{w} <|im" if i % 2 else f"{w} <" for i, w in enumerate(words)]
    out = benchmark(_run_filter, chunks, True)
    assert out == "".join(chunks)
