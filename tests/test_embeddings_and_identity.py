"""Embeddings (batched, truncated, prefixed) and model verification/identity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from xybrid import (
    ContextOverflowError,
    IntegrityError,
    InvalidInputError,
    LlamaCppBackend,
    LlmConfig,
)
from xybrid.embeddings import EmbedTask, Embedder, apply_task_prefix
from xybrid.llama_cpp_backend import sha256_file

TEXTS = [f"document {i}: {word} about the number {i * 7 % 13}"
         for i, word in enumerate(["apples", "rivers", "engines", "music"] * 16)]


@pytest.fixture(scope="module")
def embedder(tiny_llama_path: Path):  # type: ignore[no-untyped-def]
    with Embedder(tiny_llama_path, context_length=2048, max_batch_inputs=64, n_threads=1) as emb:
        yield emb


def test_batch_of_64_equals_64_single_calls(embedder: Embedder) -> None:
    assert len(TEXTS) == 64
    batched = embedder.embed(TEXTS)
    single = np.concatenate([embedder.embed([t]) for t in TEXTS])
    assert batched.shape == (64, embedder.dimensions) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    assert len({row.tobytes() for row in batched}) == 64  # distinct inputs, distinct vectors


def test_batch_is_packed_into_few_decode_calls(embedder: Embedder) -> None:
    groups = embedder._groups(embedder.tokenize(TEXTS))
    assert len(groups) == 1 and len(groups[0]) == 64
    small = Embedder.from_model(embedder._model, context_length=64, max_batch_inputs=8)
    try:
        groups = small._groups(small.tokenize(TEXTS[:20]))
        assert all(len(g) <= 8 and sum(map(len, g)) <= 64 for g in groups)
        assert sum(len(g) for g in groups) == 20
        np.testing.assert_allclose(small.embed(TEXTS[:20]), embedder.embed(TEXTS[:20]), atol=1e-5)
    finally:
        small.close()


def test_vectors_are_unit_norm_and_truncation_renormalises(embedder: Embedder) -> None:
    full = embedder.embed(TEXTS[:5])
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    short = embedder.embed(TEXTS[:5], dimensions=16)
    assert short.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    raw = embedder.embed(TEXTS[:2], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_task_prefixes_are_applied(embedder: Embedder) -> None:
    assert apply_task_prefix(EmbedTask.RETRIEVAL_QUERY, "cats") == "task: search result | query: cats"
    assert apply_task_prefix("retrieval_document", "cats") == "title: none | text: cats"
    assert apply_task_prefix(None, "cats") == apply_task_prefix("other", "cats") == "cats"
    plain = embedder.embed(["cats"])
    query = embedder.embed(["cats"], task="retrieval_query")
    prefixed = embedder.embed(["task: search result | query: cats"])
    np.testing.assert_allclose(query, prefixed, atol=1e-6)
    assert not np.allclose(query, plain)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda e: e.embed([]), InvalidInputError, "empty"),
    (lambda e: e.embed("a single string"), InvalidInputError, "sequence"),
    (lambda e: e.embed([""]), InvalidInputError, "empty"),
    (lambda e: e.embed([3]), InvalidInputError, "str"),
    (lambda e: e.embed(["x"], dimensions=10_000), InvalidInputError, "embedding size"),
    (lambda e: e.embed(["x"], dimensions=0), InvalidInputError, "dimensions"),
    (lambda e: e.embed(["x"], task="poetry"), InvalidInputError, "task"),
    (lambda e: e.embed(["word " * 3000]), ContextOverflowError, "tokens"),
])
def test_bad_embedding_input(embedder: Embedder, call, error: type, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call(embedder)
    assert embedder.embed(["still works"]).shape == (1, embedder.dimensions)


def test_embedding_on_gemma_batches_closely(gemma_path: Path) -> None:
    # Quantized weights: batch shape may change kernels, so compare by cosine.
    with Embedder(gemma_path, context_length=1024, max_batch_inputs=16, n_threads=1) as emb:
        batched = emb.embed(TEXTS[:8])
        single = np.concatenate([emb.embed([t]) for t in TEXTS[:8]])
        assert emb.pooling == "mean" and emb.dimensions == 640
        cosine = (batched * single).sum(axis=1)
        assert (cosine > 0.999).all(), cosine


def test_sha256_mismatch_refuses_to_load(tmp_path: Path, tiny_llama_path: Path) -> None:
    digest = sha256_file(tiny_llama_path)
    with LlamaCppBackend(LlmConfig(tiny_llama_path, model_sha256=digest.upper(),
                                   context_length=128)) as llm:
        assert llm.is_loaded
    wrong = "0" * 64
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        LlamaCppBackend(LlmConfig(tiny_llama_path, model_sha256=wrong))
    with pytest.raises(InvalidInputError, match="model_sha256"):
        LlmConfig(tiny_llama_path, model_sha256="not-a-digest")
    with pytest.raises(InvalidInputError, match="mmproj_path"):
        LlamaCppBackend(LlmConfig(tiny_llama_path, mmproj_sha256=wrong))
    # One changed byte is enough to refuse.
    tampered = tmp_path / "tampered.gguf"
    shutil.copy(tiny_llama_path, tampered)
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        LlamaCppBackend(LlmConfig(tampered, model_sha256=digest))


def test_model_label(tmp_path: Path, tiny_llama_path: Path, gemma_path: Path) -> None:
    with LlamaCppBackend(LlmConfig(tiny_llama_path, context_length=128)) as llm:
        assert llm.model_label == "xybrid-tiny-llama"  # general.name
    with LlamaCppBackend(LlmConfig(gemma_path, context_length=128, n_threads=1)) as llm:
        caps = llm.capabilities()
        assert caps.model_label == llm.model_label
        assert llm.model_label == (llm.model.name or gemma_path.stem)
        assert caps.accelerator == "cpu" and caps.embeddings and not caps.vision
