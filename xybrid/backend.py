"""The backend interface every xybrid inference engine implements.

A backend loads one model and turns chat messages (or a raw prompt) into a
:class:`~xybrid.types.GenerationOutput`. Streaming has three shapes:
``generate_streaming`` (a callback per piece), ``stream`` (a generator) and
``astream`` (an async generator). A backend that only implements
``generate`` still offers all three: the defaults emit the whole reply as one
piece, so callers never need to special-case a non-streaming engine.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Mapping, TypeVar, Union

from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig, PartialToken

__all__ = ["LlmBackend", "MessageLike", "StreamingCallback", "stream_in_thread"]

MessageLike = Union[ChatMessage, Mapping[str, Any]]
"""A :class:`ChatMessage` or an OpenAI-style ``{"role": ..., "content": ...}`` dict."""

StreamingCallback = Callable[[PartialToken], object]
"""Receives each piece; returning ``False`` stops the generation."""

_B = TypeVar("_B", bound="LlmBackend")


class LlmBackend(ABC):
    """Interface of a local LLM engine (load, generate, stream, telemetry)."""

    # --- identity -------------------------------------------------------------
    @property
    @abstractmethod
    def name(self) -> str:
        """Backend name, e.g. ``"llama-cpp"``."""

    @property
    def supported_formats(self) -> tuple[str, ...]:
        """Model file formats this backend loads."""
        return ()

    @property
    def wire_label(self) -> str | None:
        """Closed-set label of the runtime for telemetry (``"llamacpp"``); None for test backends."""
        return None

    # --- lifecycle ---------------------------------------------------------------
    @abstractmethod
    def load(self, config: LlmConfig) -> None:
        """Load the model described by ``config`` (replacing any loaded one)."""

    @property
    @abstractmethod
    def is_loaded(self) -> bool:
        """True while a model is loaded."""

    @abstractmethod
    def unload(self) -> None:
        """Free the model and its context. Safe to call when nothing is loaded."""

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unload()

    # --- generation --------------------------------------------------------------
    @abstractmethod
    def generate(
        self, messages: Sequence[MessageLike], config: GenerationConfig | None = None
    ) -> GenerationOutput:
        """Reply to a conversation (the chat template is applied)."""

    @abstractmethod
    def generate_raw(self, prompt: str, config: GenerationConfig | None = None) -> GenerationOutput:
        """Continue ``prompt`` as it is: no chat template, only the caller's stop sequences."""

    @property
    def supports_streaming(self) -> bool:
        """True when pieces arrive while the model generates (not all at the end)."""
        return False

    def generate_streaming(
        self,
        messages: Sequence[MessageLike],
        config: GenerationConfig | None,
        on_token: StreamingCallback,
    ) -> GenerationOutput:
        """Like :meth:`generate`, calling ``on_token`` for each piece.

        This default runs :meth:`generate` and reports the whole reply as one
        final piece. An exception raised by ``on_token`` propagates.
        """
        output = self.generate(messages, config)
        on_token(PartialToken(output.text, 0, output.text, None, output.finish_reason,
                              output.tool_calls, output))
        return output

    def stream(
        self, messages: Sequence[MessageLike], config: GenerationConfig | None = None
    ) -> Iterator[PartialToken]:
        """Yield the reply piece by piece; the last piece carries ``finish_reason``.

        This default drives :meth:`generate_streaming` on a helper thread.
        Closing the generator early stops the generation.
        """
        return _stream_via_callback(self, messages, config)

    async def astream(
        self, messages: Sequence[MessageLike], config: GenerationConfig | None = None
    ) -> AsyncIterator[PartialToken]:
        """Async version of :meth:`stream`: the event loop never blocks on the model."""
        async for piece in stream_in_thread(lambda: self.stream(messages, config)):
            yield piece

    # --- facts ----------------------------------------------------------------------
    def memory_usage(self) -> int | None:
        """Approximate bytes held by the model and its context; None when unknown."""
        return None

    def context_length(self) -> int | None:
        """Context window of the loaded model in tokens; None when nothing is loaded."""
        return None

    def last_cached_prefix_len(self) -> int | None:
        """Prompt tokens the latest call reused from the KV cache.

        None for backends without cross-call cache state, or before any call;
        0 when the latest call shared no prefix with the previous one.
        """
        return None

    def stats(self) -> dict[str, int | float]:
        """Engine load now: ``parallel`` (slots), ``running`` and ``queued``
        requests, ``kv_cells_used`` / ``kv_cells_total``, ``batch_occupancy``
        (mean sequences per decode step) and counters since load. Empty for
        backends that do not report it."""
        return {}


def _stream_via_callback(
    backend: LlmBackend, messages: Sequence[MessageLike], config: GenerationConfig | None
) -> Iterator[PartialToken]:
    """Turn the callback form into a generator with a helper thread and a queue."""
    import queue as queue_mod

    pieces: queue_mod.Queue[tuple[str, Any]] = queue_mod.Queue(maxsize=64)
    cancelled = threading.Event()

    def on_token(piece: PartialToken) -> object:
        if cancelled.is_set():
            return False
        pieces.put(("piece", piece))
        return None

    def run() -> None:
        try:
            backend.generate_streaming(messages, config, on_token)
        except BaseException as exc:
            pieces.put(("error", exc))
            return
        pieces.put(("done", None))

    worker = threading.Thread(target=run, name="xybrid-stream", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = pieces.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        cancelled.set()
        while worker.is_alive():
            try:
                pieces.get(timeout=0.05)
            except queue_mod.Empty:
                pass
        worker.join()


async def stream_in_thread(make: Callable[[], Iterator[PartialToken]]) -> AsyncIterator[PartialToken]:
    """Drive a blocking piece iterator on a helper thread and hand its pieces
    to the event loop as an async generator. Closing it early stops the
    iterator at its next piece (closing it, which cancels the generation) and
    waits for the thread without blocking the loop. An iterator with a
    ``cancel()`` method that may be called from any thread (the streams of
    :class:`~xybrid.LlamaCppBackend`) is cancelled at once, so a timeout or
    a closed connection does not wait for a long prefill to end."""
    import asyncio  # here: a program that never streams asynchronously does not pay for asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()
    made: list[Any] = []  # the iterator, for cancel() from the loop's side

    def post(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass

    def pump() -> None:
        pieces: Any = None
        try:
            if stop.is_set():  # closed before the thread started
                return
            # Inside the try: a stream() that validates eagerly raises
            # here, and the consumer must get that error, not wait forever.
            pieces = make()
            made.append(pieces)
            if stop.is_set():
                return
            for piece in pieces:
                if stop.is_set():
                    break
                post(("piece", piece))
        except BaseException as exc:  # re-raised in the consumer
            post(("error", exc))
            return
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        post(("done", None))

    worker = threading.Thread(target=pump, name="xybrid-astream", daemon=True)
    worker.start()
    ended = False
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                ended = True
                raise value
            else:
                ended = True
                return
    finally:
        stop.set()
        cancel = getattr(made[0], "cancel", None) if made and not ended else None
        if cancel is not None:
            cancel()
        await asyncio.to_thread(worker.join)
