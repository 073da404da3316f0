"""Compatibility layers: run code written for other libraries on xybrid.

:mod:`xybrid.compat.llama_cpp` mirrors llama-cpp-python's high-level API.
Change ``from llama_cpp import Llama`` to ``from xybrid.compat.llama_cpp
import Llama``, or call :func:`install_llama_cpp` once, before the code
(yours or a framework's: LangChain, LlamaIndex, ...) imports ``llama_cpp``.
"""

from __future__ import annotations

import sys
import types

__all__ = ["install_llama_cpp", "uninstall_llama_cpp"]

# Submodule names of llama-cpp-python that code imports from directly; each
# resolves to the facade, whose names cover what they would export that
# xybrid provides.
_ALIASES = ("llama_cpp", "llama_cpp.llama", "llama_cpp.llama_grammar", "llama_cpp.llama_cache")


def install_llama_cpp(*, force: bool = False) -> types.ModuleType:
    """Register :mod:`xybrid.compat.llama_cpp` as ``llama_cpp`` in
    ``sys.modules`` (and its ``llama``, ``llama_grammar``, ``llama_cache``
    submodules), so ``from llama_cpp import Llama`` gets the facade.

    Opt-in and process-wide. When the real llama-cpp-python was already
    imported it is left in place unless ``force=True``. The peer's ctypes
    functions (``llama_cpp.llama_decode`` ...) are not provided: accessing
    one raises an ``AttributeError`` that says so. Returns the module.
    """
    from xybrid.compat import llama_cpp as facade

    current = sys.modules.get("llama_cpp")
    if current is not None and current is not facade and not force:
        return current
    for name in _ALIASES:
        sys.modules[name] = facade
    return facade


def uninstall_llama_cpp() -> None:
    """Undo :func:`install_llama_cpp` (only the aliases it made)."""
    from xybrid.compat import llama_cpp as facade

    for name in _ALIASES:
        if sys.modules.get(name) is facade:
            del sys.modules[name]
