"""xybrid: fast local language models from Python on llama.cpp.

The main entry points::

    from xybrid import LlamaCppBackend, LlmConfig, GenerationConfig, ChatMessage

    with LlamaCppBackend(LlmConfig(default_model_path())) as llm:
        for piece in llm.stream([ChatMessage.user("Hello!")], GenerationConfig(max_tokens=64)):
            print(piece.text, end="", flush=True)
"""

from xybrid._build_info import LLAMA_CPP_COMMIT as __llama_cpp_commit__
from xybrid._build_info import VERSION as __version__
from xybrid.backend import LlmBackend
from xybrid.default_model import default_model_path
from xybrid.errors import (
    ContextOverflowError,
    GenerationError,
    GrammarError,
    IntegrityError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotLoadedError,
    UnsupportedInputError,
    XybridError,
)
from xybrid.llama_cpp_backend import LlamaCppBackend
from xybrid.model_files import resolve_model_path
from xybrid.types import ChatMessage, GenerationConfig, GenerationOutput, LlmConfig, PartialToken

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
    "PartialToken",
    "UnsupportedInputError",
    "XybridError",
    "default_model_path",
    "resolve_model_path",
]
