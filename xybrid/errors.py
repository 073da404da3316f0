"""Exception types raised by xybrid.

Every failure the package can diagnose surfaces as a subclass of
:class:`XybridError`. Where a built-in exception already carries the right
meaning (a missing file, a bad value) the xybrid type also derives from it, so
``except FileNotFoundError`` or ``except ValueError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "XybridError",
    "ModelNotFoundError",
    "ModelLoadError",
    "ModelNotLoadedError",
    "InvalidInputError",
    "ContextOverflowError",
    "GrammarError",
    "GenerationError",
    "UnsupportedInputError",
    "IntegrityError",
    "OverloadedError",
    "RemoteServerError",
    "ToolCallError",
    "SessionStateError",
]


class XybridError(Exception):
    """Base class of every error raised by xybrid."""


class ModelNotFoundError(XybridError, FileNotFoundError):
    """The model path does not exist, or a directory holds no ``.gguf`` file."""


class ModelLoadError(XybridError, RuntimeError):
    """llama.cpp refused the file: not GGUF, truncated, or an unknown architecture."""


class ModelNotLoadedError(XybridError, RuntimeError):
    """An operation needs a loaded model and none is loaded."""


class InvalidInputError(XybridError, ValueError):
    """An argument has the wrong type or an out-of-range value."""


class ContextOverflowError(InvalidInputError):
    """The prompt does not fit in the context window."""


class GrammarError(InvalidInputError):
    """A GBNF grammar (or a JSON schema converted to one) could not be used."""


class UnsupportedInputError(InvalidInputError):
    """The input kind (audio, embedding, video, ...) is not handled by this path."""


class IntegrityError(XybridError):
    """A file's SHA-256 does not match the expected digest."""


class GenerationError(XybridError, RuntimeError):
    """llama.cpp failed while decoding; the backend has been reset and stays usable."""


class OverloadedError(XybridError, RuntimeError):
    """Every slot is busy and the admission queue is full: retry later."""


class RemoteServerError(XybridError, ConnectionError):
    """An RPC server (``xybrid rpc-server``) did not answer, speaks another
    protocol version, or was lost during a call. ``endpoint`` is its
    "host:port" when known. After a loss mid-call the model must be loaded
    again; the backend stays usable for that."""

    def __init__(self, message: str, *, endpoint: str | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class ToolCallError(GenerationError):
    """The model started a tool call that does not parse; ``raw`` holds its text."""

    def __init__(self, message: str, raw: str) -> None:
        super().__init__(message)
        self.raw = raw


class SessionStateError(InvalidInputError):
    """A saved session state cannot be restored here: it was saved from another
    model, or the data is damaged or too large for this context."""
