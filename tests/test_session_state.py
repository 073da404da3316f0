"""Session state: save the KV cache and the prefix-cache record, restore them
(in the same or another backend on the same model) and continue identically;
a state from another model is refused with a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from xybrid import GenerationConfig, LlmConfig
from xybrid._native import _engine
from xybrid.errors import SessionStateError
from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.session_state import SessionState

PROMPT = "Once upon a time, in a small village,"


def _config(n: int) -> GenerationConfig:
    return GenerationConfig.greedy(max_tokens=n)


@pytest.fixture(scope="module")
def gemma_pair(gemma_path):  # type: ignore[no-untyped-def]
    a = LlamaCppBackend(LlmConfig(gemma_path, context_length=512, n_threads=1))
    b = LlamaCppBackend(LlmConfig(gemma_path, context_length=512, n_threads=1))
    yield a, b
    a.unload()
    b.unload()


def test_restore_gives_the_identical_continuation(gemma_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = gemma_pair
    prompt = a.model.tokenize(PROMPT, add_special=True)
    first = a.generate_raw(prompt, _config(8))
    state = a.save_state()
    assert isinstance(state, SessionState) and state.data
    assert list(state.tokens) == prompt + list(first.token_ids[:-1])
    a.save_session(tmp_path / "chat.session")
    follow = prompt + list(first.token_ids) + a.model.tokenize(" Then", add_special=False)
    expected = a.generate_raw(follow, _config(8))

    # In another backend on the same model, from memory and from the file.
    b.reset_cache()
    b.load_state(state)
    got = b.generate_raw(follow, _config(8))
    assert got.token_ids == expected.token_ids
    assert got.cached_prompt_tokens == expected.cached_prompt_tokens > len(prompt)

    b.reset_cache()
    b.load_session(tmp_path / "chat.session")
    assert b.generate_raw(follow, _config(8)).token_ids == expected.token_ids

    # Back into the backend that saved it, after it moved on.
    a.generate_raw("Something else entirely.", _config(3))
    a.load_state(state)
    assert a.generate_raw(follow, _config(8)).token_ids == expected.token_ids


def test_state_from_another_model_is_refused(gemma_pair, tiny_llama_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, _ = gemma_pair
    a.generate_raw(PROMPT, _config(2))
    gemma_state = a.save_state()
    a.save_session(tmp_path / "gemma.session")
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=512, n_threads=1)) as tiny:
        tiny.generate_raw("hello", _config(2))
        with pytest.raises(SessionStateError, match="different model"):
            tiny.load_state(gemma_state)
        with pytest.raises(SessionStateError, match="different model"):
            tiny.load_session(tmp_path / "gemma.session")
        # Refused before anything was touched; the backend stays usable.
        assert tiny.generate_raw("hello", _config(2)).tokens_generated == 2
        tiny_state = tiny.save_state()
    with pytest.raises(SessionStateError, match="different model"):
        a.load_state(tiny_state)
    assert a.generate_raw(PROMPT, _config(2)).tokens_generated == 2


def test_damaged_or_foreign_files_are_refused(gemma_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, _ = gemma_pair
    bad = tmp_path / "not-a-session"
    bad.write_bytes(b"hello")
    with pytest.raises(SessionStateError, match="not an xybrid session"):
        a.load_session(bad)
    with pytest.raises(SessionStateError, match="cannot read"):
        a.load_session(tmp_path / "missing")
    a.generate_raw(PROMPT, _config(2))
    a.save_session(tmp_path / "ok.session")
    blob = (tmp_path / "ok.session").read_bytes()
    (tmp_path / "cut.session").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SessionStateError):
        a.load_session(tmp_path / "cut.session")
    assert a.generate_raw(PROMPT, _config(2)).tokens_generated == 2
    with pytest.raises(SessionStateError):
        a.load_state("not a state")  # type: ignore[arg-type]


def test_context_sequence_state_file_round_trip(tiny_llama_path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = _engine.Model(str(tiny_llama_path))
    ctx = _engine.Context(model, n_ctx=256, n_threads=1)
    tokens = model.tokenize("one two three four", add_special=True)
    ctx.decode(tokens, 0)
    want = ctx.logits()
    path = tmp_path / "seq.bin"
    assert ctx.seq_state_save_file(str(path), tokens) > 0
    blob = ctx.seq_state_get(0)
    assert len(blob) == ctx.seq_state_size(0)
    ctx.memory_clear()
    assert ctx.seq_pos_max(0) == -1
    assert ctx.seq_state_load_file(str(path)) == tokens
    assert ctx.seq_pos_max(0) == len(tokens) - 1
    ctx.memory_clear()
    ctx.seq_state_set(blob)
    # The restored cache gives the same logits for the next position.
    ctx.seq_rm(0, len(tokens) - 1, -1)
    ctx.decode(tokens[-1:], len(tokens) - 1)
    assert ctx.logits() == pytest.approx(want, abs=1e-5)
    with pytest.raises(Exception):
        ctx.seq_state_set(b"")
    with pytest.raises(Exception):
        ctx.seq_state_load_file(str(tmp_path / "missing.bin"))
