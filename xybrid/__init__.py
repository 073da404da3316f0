"""xybrid: fast local language models from Python on llama.cpp."""

from xybrid._build_info import LLAMA_CPP_COMMIT as __llama_cpp_commit__
from xybrid._build_info import VERSION as __version__

__all__ = ["__version__", "__llama_cpp_commit__"]
