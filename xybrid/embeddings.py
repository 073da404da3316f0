"""Text embeddings on a dedicated llama.cpp context.

An :class:`Embedder` never shares a context with generation: it owns an
embedding context (pooling applied by llama.cpp, mean by default) and packs
many inputs into one decode call, one llama sequence per input, so a corpus
costs a handful of calls instead of one per text.

Optional Matryoshka truncation keeps the leading ``dimensions`` values and
re-normalises them to unit length, the convention of models trained with
Matryoshka representation learning (EmbeddingGemma and others). Task
prefixes are the instruction strings such models were trained with.

With quantized weights llama.cpp may pick different matrix kernels for
batches of different shapes, so an input's vector can vary slightly (cosine
similarity above 0.999) with what it was batched with. F16/F32 models give
the same vector either way.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from xybrid.errors import ContextOverflowError, InvalidInputError
from xybrid.model_files import resolve_model_path

__all__ = ["EmbedTask", "Embedder", "apply_task_prefix", "truncate_and_normalize"]


class EmbedTask(str, enum.Enum):
    """What the embedding is for; selects the instruction prefix."""

    RETRIEVAL_QUERY = "retrieval_query"
    RETRIEVAL_DOCUMENT = "retrieval_document"
    SIMILARITY = "similarity"
    CLASSIFICATION = "classification"
    CLUSTERING = "clustering"
    QUESTION_ANSWERING = "question_answering"
    FACT_VERIFICATION = "fact_verification"
    CODE_RETRIEVAL_QUERY = "code_retrieval_query"
    OTHER = "other"


_TASK_PREFIXES: dict[EmbedTask, str] = {
    EmbedTask.RETRIEVAL_QUERY: "task: search result | query: ",
    EmbedTask.RETRIEVAL_DOCUMENT: "title: none | text: ",
    EmbedTask.SIMILARITY: "task: sentence similarity | query: ",
    EmbedTask.CLASSIFICATION: "task: classification | query: ",
    EmbedTask.CLUSTERING: "task: clustering | query: ",
    EmbedTask.QUESTION_ANSWERING: "task: question answering | query: ",
    EmbedTask.FACT_VERIFICATION: "task: fact checking | query: ",
    EmbedTask.CODE_RETRIEVAL_QUERY: "task: code retrieval | query: ",
}


def apply_task_prefix(task: EmbedTask | str | None, text: str) -> str:
    """``text`` with the instruction prefix of ``task`` (unchanged for None/"other")."""
    if task is None:
        return text
    try:
        key = EmbedTask(task)
    except ValueError:
        valid = ", ".join(t.value for t in EmbedTask)
        raise InvalidInputError(f"unknown embedding task {task!r}; valid: {valid}") from None
    return _TASK_PREFIXES.get(key, "") + text


def truncate_and_normalize(
    vectors: npt.NDArray[np.float32], dimensions: int | None, normalize: bool = True
) -> npt.NDArray[np.float32]:
    """Keep the leading ``dimensions`` columns and scale rows to unit L2 norm.

    Zero rows stay zero (no division by zero).
    """
    n_embd = vectors.shape[1]
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0:
            raise InvalidInputError(f"dimensions must be a positive integer, got {dimensions!r}")
        if dimensions > n_embd:
            raise InvalidInputError(
                f"dimensions {dimensions} exceeds the model's embedding size {n_embd}")
        vectors = vectors[:, :dimensions]
    out = np.array(vectors, dtype=np.float32, copy=True)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


class Embedder:
    """Embed texts with a GGUF model.

    ``Embedder(path, pooling="mean", context_length=2048, max_batch_inputs=64)``
    loads the model itself; ``Embedder.from_model(model)`` shares an already
    loaded native model (its weights are not loaded twice). ``context_length``
    bounds the tokens of one batch, and so the longest single input.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *,
                 pooling: str = "mean", context_length: int = 2048,
                 max_batch_inputs: int = 64, n_threads: int = 0, gpu_layers: int = 0,
                 _model: Any = None) -> None:
        from xybrid._native import _engine

        if isinstance(max_batch_inputs, bool) or not isinstance(max_batch_inputs, int) \
                or not 1 <= max_batch_inputs <= 256:
            raise InvalidInputError(
                f"max_batch_inputs must be an integer in 1..256, got {max_batch_inputs!r}")
        if _model is None:
            if model_path is None:
                raise InvalidInputError("Embedder needs a model path")
            _model = _engine.Model(str(resolve_model_path(model_path)), gpu_layers=gpu_layers)
            self._owns_model = True
        else:
            self._owns_model = False
        self._model = _model
        self._lock = threading.Lock()
        try:
            self._ctx = _engine.Context(
                _model, n_ctx=context_length, n_batch=context_length, n_ubatch=context_length,
                n_threads=n_threads, n_seq_max=max_batch_inputs, embeddings=True, pooling=pooling)
        except BaseException:
            if self._owns_model:
                _model.close()
            raise
        self.max_batch_inputs = max_batch_inputs
        self.context_length = context_length

    @classmethod
    def from_model(cls, model: Any, **options: Any) -> Embedder:
        """An embedder on an already loaded native ``Model`` (not closed with it)."""
        return cls(None, _model=model, **options)

    @property
    def dimensions(self) -> int:
        """Length of the full embedding vector (the model's n_embd)."""
        return int(self._model.n_embd)

    @property
    def pooling(self) -> str:
        return str(self._ctx.pooling)

    def close(self) -> None:
        with self._lock:
            self._ctx.close()
            if self._owns_model:
                self._model.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, texts: Sequence[str], task: EmbedTask | str | None = None) -> list[list[int]]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError("texts must be a sequence of strings (wrap a single text in a list)")
        if len(texts) == 0:
            raise InvalidInputError("texts is empty: nothing to embed")
        out = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts[{i}] must be a str, got {type(text).__name__}")
            if not text.strip():
                raise InvalidInputError(f"texts[{i}] is empty")
            tokens = self._model.tokenize(apply_task_prefix(task, text), add_special=True,
                                          parse_special=False)
            if len(tokens) > self.context_length:
                raise ContextOverflowError(
                    f"texts[{i}] has {len(tokens)} tokens, more than the embedding context of "
                    f"{self.context_length}; raise context_length or split the text")
            out.append(tokens)
        return out

    def embed(self, texts: Sequence[str], *, dimensions: int | None = None,
              task: EmbedTask | str | None = None, normalize: bool = True) -> npt.NDArray[np.float32]:
        """Embeddings of ``texts`` as a float32 array of shape ``(len(texts), dim)``.

        Inputs are packed into as few decode calls as the context allows.
        ``dimensions`` truncates (Matryoshka) before normalising; ``task``
        prepends the instruction prefix; ``normalize`` scales to unit norm.
        """
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 0 < dimensions <= self.dimensions):
            raise InvalidInputError(
                f"dimensions must be an integer in 1..{self.dimensions} (the model's embedding "
                f"size), got {dimensions!r}")
        sequences = self.tokenize(texts, task)
        rows: list[npt.NDArray[np.float32]] = []
        with self._lock:
            for group in self._groups(sequences):
                data, n_embd = self._ctx.embed(group)
                rows.append(np.frombuffer(data, dtype=np.float32).reshape(len(group), n_embd))
        return truncate_and_normalize(np.concatenate(rows), dimensions, normalize)

    def _groups(self, sequences: list[list[int]]) -> list[list[list[int]]]:
        """Pack inputs in order into batches within the sequence and token limits."""
        groups: list[list[list[int]]] = []
        current: list[list[int]] = []
        tokens = 0
        for seq in sequences:
            if current and (len(current) == self.max_batch_inputs
                            or tokens + len(seq) > self.context_length):
                groups.append(current)
                current, tokens = [], 0
            current.append(seq)
            tokens += len(seq)
        if current:
            groups.append(current)
        return groups
