"""What the HTTP layer drives: the loaded backend, the embedder, admission.

The backend's calls are safe to make concurrently; with ``parallel`` slots
the batching engine decodes them together. The server adds its own
admission bound (``parallel + max_queued`` sequences in flight) so an
overloaded server answers 429 at once instead of queueing without bound,
whatever the engine does underneath.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from xybrid.backend import stream_in_thread
from xybrid.errors import ModelNotLoadedError, OverloadedError
from xybrid.server.settings import ServerSettings
from xybrid.types import GenerationConfig, LlmConfig, PartialToken

__all__ = ["Admission", "Engine", "astream_raw", "iterate_in_thread"]

log = logging.getLogger("xybrid.server")


class Admission:
    """Counts sequences in flight (running or queued); over capacity is refused.

    Used from the event loop only, so plain integers suffice.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def acquire(self, n: int = 1) -> None:
        if self.in_flight + n > self.capacity:
            raise OverloadedError(
                f"the server is busy: {self.in_flight} sequences in flight, room for "
                f"{self.capacity}; retry later")
        self.in_flight += n

    def release(self, n: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - n)


class Engine:
    """The loaded model (and embedder); loading runs on a thread so /health
    can answer "loading" meanwhile."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.state = "loading"  # loading -> ready | failed; stopping at shutdown
        self.error: str | None = None
        self.backend: Any = None
        self.model_path: Path | None = None
        self.model_id = settings.alias or ""
        self.created = int(time.time())
        self.admission = Admission(settings.parallel + settings.max_queued)
        self._embedder: Any = None
        self._embedder_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------
    def load(self) -> None:
        """Load the model (blocking; run it on a thread)."""
        from xybrid.llama_cpp_backend import LlamaCppBackend
        from xybrid.model_files import resolve_model_path

        s = self.settings
        try:
            if s.model is None:
                from xybrid.default_model import default_chat_model_path

                path = default_chat_model_path()
            else:
                path = resolve_model_path(s.model)
            from xybrid.rpc import parse_server_list, parse_tensor_split

            config = LlmConfig(path, context_length=s.ctx_size, n_threads=s.threads,
                               gpu_layers=s.gpu_layers, mmproj_path=s.mmproj,
                               chat_template=s.chat_template, parallel=s.parallel,
                               max_queued=s.max_queued, rpc_servers=parse_server_list(s.rpc),
                               tensor_split=parse_tensor_split(s.tensor_split))
            self.backend = LlamaCppBackend(config)
            self.model_path = Path(path)
            if not self.model_id:
                self.model_id = self.model_path.stem
            if s.embedding_model is not None:
                self.embedder()  # load it now: a bad path should fail at start, not later
        except BaseException as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("xybrid serve: could not load the model: %s", self.error)
            raise
        self.state = "ready"
        log.info("xybrid serve: model %s ready (%s)", self.model_id, self.model_path)

    def close(self) -> None:
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
                self._embedder = None
        if self.backend is not None:
            self.backend.unload()

    def require(self) -> Any:
        if self.state != "ready" or self.backend is None:
            what = {"loading": "the model is still loading",
                    "stopping": "the server is shutting down",
                    "failed": f"the model failed to load ({self.error})"}.get(self.state, self.state)
            raise ModelNotLoadedError(what)
        return self.backend

    # --- facts --------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return int(self.require().context_length() or self.settings.ctx_size)

    def stats(self) -> dict[str, int | float]:
        backend = self.backend
        try:
            return dict(backend.stats()) if backend is not None else {}
        except Exception:  # stats are best effort; /metrics must always answer
            return {}

    def embedder(self) -> Any:
        """The embedding model: ``--embedding-model`` or the main model's weights
        (mean pooling) on a context of its own."""
        from xybrid.embeddings import Embedder

        with self._embedder_lock:
            if self._embedder is None:
                s = self.settings
                if s.embedding_model is not None:
                    self._embedder = Embedder(s.embedding_model, n_threads=s.threads,
                                              gpu_layers=s.gpu_layers)
                else:
                    self._embedder = Embedder.from_model(self.require().model,
                                                         n_threads=s.threads)
            return self._embedder

    @property
    def embedding_model_id(self) -> str:
        s = self.settings
        if s.embedding_model is None:
            return self.model_id
        return Path(s.embedding_model).stem


def iterate_in_thread(make: Callable[[], Iterator[PartialToken]]) -> AsyncIterator[PartialToken]:
    """Drive a blocking generator on a worker thread, as an async generator
    (:func:`xybrid.backend.stream_in_thread`). Closing it closes the
    generator (the engine cancels the sequence) at its next piece."""
    return stream_in_thread(make)


def astream_raw(backend: Any, prompt: str | list[int],
                config: GenerationConfig) -> AsyncIterator[PartialToken]:
    """The raw-prompt stream as an async generator: the backend's own
    ``astream_raw`` where it has one, else ``stream_raw`` on a thread."""
    native = getattr(backend, "astream_raw", None)
    if native is not None:
        return native(prompt, config)  # type: ignore[no-any-return]
    return iterate_in_thread(lambda: backend.stream_raw(prompt, config))
