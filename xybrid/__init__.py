"""xybrid: fast local language models from Python on llama.cpp.

The main entry points::

    from xybrid import LlamaCppBackend, LlmConfig, GenerationConfig, ChatMessage

    with LlamaCppBackend(LlmConfig(default_model_path())) as llm:
        for piece in llm.stream([ChatMessage.user("Hello!")], GenerationConfig(max_tokens=64)):
            print(piece.text, end="", flush=True)

The classes and functions below are imported on first use (PEP 562), so a
program that only needs the engine (``xybrid._native._engine``) or the error
types does not load the backend, templates and tool-call parsing.
"""

from __future__ import annotations

import importlib

# Not `from typing import TYPE_CHECKING`: importing typing costs every
# process ~1.6 MiB and ~10 ms, and the engine alone needs nothing from it.
# Type checkers treat any name TYPE_CHECKING as true.
TYPE_CHECKING = False

from xybrid._build_info import LLAMA_CPP_COMMIT as __llama_cpp_commit__
from xybrid._build_info import VERSION as __version__
from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    GrammarError,
    IntegrityError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotLoadedError,
    OverloadedError,
    RemoteServerError,
    UnsupportedInputError,
    XybridError,
)

if TYPE_CHECKING:
    from typing import Any

    from xybrid.backend import LlmBackend
    from xybrid.default_model import default_model_path
    from xybrid.llama_cpp_backend import LlamaCppBackend
    from xybrid.model_files import resolve_model_path
    from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig, PartialToken

# public name -> the module that defines it
_LAZY = {
    "LlmBackend": "xybrid.backend",
    "LlamaCppBackend": "xybrid.llama_cpp_backend",
    "default_model_path": "xybrid.default_model",
    "resolve_model_path": "xybrid.model_files",
    "ChatMessage": "xybrid.types",
    "GenerationConfig": "xybrid.types",
    "GenerationOutput": "xybrid.types",
    "LlmConfig": "xybrid.types",
    "PartialToken": "xybrid.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xybrid' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "__llama_cpp_commit__",
    "ChatMessage",
    "ContextOverflowError",
    "GenerationConfig",
    "GenerationError",
    "GenerationOutput",
    "GrammarError",
    "IntegrityError",
    "InvalidInputError",
    "LlamaCppBackend",
    "LlmBackend",
    "LlmConfig",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotLoadedError",
    "OverloadedError",
    "PartialToken",
    "RemoteServerError",
    "UnsupportedInputError",
    "XybridError",
    "default_model_path",
    "resolve_model_path",
]
